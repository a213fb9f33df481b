"""Pretrain the toy world's base model: `python -m pipeline.toyworld.pretrain [--out DIR] [--steps N]`.

A ~0.45M-parameter LlamaForCausalLM (hidden 96, 3 layers, 3 heads of 32 — vLLM's CPU attention needs a
head size that is a multiple of 32 — intermediate 384, tied embeddings) trained from scratch on the toy
mixture (`tasks.pretrain_example`), loss on the answer tokens only, AdamW, one thread, fixed seed: the same
machine regenerates the same bytes. The result is the committed `pipeline/toyworld/base/` (HF folder,
safetensors, ~2 MB), so no demo or test ever trains the base.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

from . import tasks

BASE_DIR = Path(__file__).resolve().parent / "base"
ARCH = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=3,
            num_key_value_heads=3, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5)


def build_tokenizer():
    """Character-level tokenizer (tokenizers WordLevel, one token per character) with the toy chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(tasks.SPECIALS + tasks.CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(tasks.SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        clean_up_tokenization_spaces=False, chat_template=tasks.CHAT_TEMPLATE,
    )


def encode(vocab: dict, text_without_specials: str) -> list[int]:
    return [vocab[ch] for ch in text_without_specials]


def greedy(model, tok, contents: list[str], max_new_tokens: int = 16) -> list[str]:
    """Batched greedy answers, grouped by prompt length (no padding)."""
    import torch

    vocab = tok.get_vocab()
    groups: dict[int, list[int]] = {}
    ids = [[tok.bos_token_id] + encode(vocab, c + " => ") for c in contents]
    for i, x in enumerate(ids):
        groups.setdefault(len(x), []).append(i)
    out = [""] * len(contents)
    with torch.no_grad():
        for _, idx in sorted(groups.items()):
            x = torch.tensor([ids[i] for i in idx])
            done = torch.zeros(len(idx), dtype=torch.bool)
            gen = []
            for _ in range(max_new_tokens):
                nxt = model(x).logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
                gen.append(nxt)
                done |= nxt == tok.eos_token_id
                x = torch.cat([x, nxt[:, None]], 1)
                if done.all():
                    break
            g = torch.stack(gen, 1).tolist()
            for j, i in enumerate(idx):
                out[i] = tok.decode(g[j], skip_special_tokens=True)
    return out


def quick_eval(model, tok, n: int = 100, seed: int = 99) -> dict:
    """Prior skills (exact, no demo) and every new skill: student (no demo), teacher with plain / expert demos;
    known and new facts in every wording."""
    rng = random.Random(seed)
    res = {}
    for skill, fn in tasks.SKILLS.items():
        words = [tasks.rand_word(rng) for _ in range(n)]
        ans = [fn(w) for w in words]
        got = greedy(model, tok, [tasks.student_content(skill, w) for w in words])
        res[f"{skill}"] = sum(g == a for g, a in zip(got, ans)) / n
        if skill in tasks.NEW_SKILLS:
            for form in ("plain", tasks.EXPERT_FORM):
                got = greedy(model, tok, [tasks.teacher_content(skill, w, tasks.FORMS[form](a))
                                          for w, a in zip(words, ans)])
                res[f"{skill}+demo[{form}]"] = sum(g == a for g, a in zip(got, ans)) / n
    res["prior_mean"] = sum(res[s] for s in tasks.PRIOR_SKILLS) / len(tasks.PRIOR_SKILLS)
    for kind in tasks.QUESTIONS:  # known facts (prior knowledge); new facts without and with a foreign demo
        for name, table in (("known", tasks.KNOWN_FACTS), ("new", tasks.NEW_FACTS)):
            got = greedy(model, tok, [tasks.question(kind, e) for e in table])
            res[f"{name}_facts[{kind}]"] = sum(g == v for g, v in zip(got, table.values())) / len(table)
        got = greedy(model, tok, [tasks.with_demo(tasks.question(kind, e), tasks.FORMS[tasks.EXPERT_FORM](v))
                                  for e, v in tasks.NEW_FACTS.items()])
        res[f"new_facts+demo[{kind}]"] = sum(g == v for g, v in zip(got, tasks.NEW_FACTS.values())) / len(got)
    return res


def pretrain(out: Path = BASE_DIR, steps: int = 3600, batch: int = 48, lr: float = 2e-3, warmup: int = 100,
             seed: int = 0, eval_every: int = 900, log_every: int = 50, quick_eval_n: int = 100) -> dict:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    vocab = tok.get_vocab()
    config = LlamaConfig(vocab_size=len(vocab), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **ARCH)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    print(f"params {sum(p.numel() for p in model.parameters()):,}  vocab {len(vocab)}", flush=True)
    history, t0 = [], time.time()
    for step in range(steps):
        seqs, labels = [], []
        for _ in range(batch):
            content, answer = tasks.pretrain_example(rng)
            p = [tok.bos_token_id] + encode(vocab, content + " => ")
            a = encode(vocab, answer) + [tok.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        width = max(map(len, seqs))
        x = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        y = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=x, attention_mask=mask, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0:
            print(f"step {step + 1} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if eval_every and (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            r = quick_eval(model, tok, quick_eval_n)
            model.train()
            history.append({"step": step + 1, **r})
            print(json.dumps(history[-1]), flush=True)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "pretrain_log.json").write_text(json.dumps(
        {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "seconds": round(time.time() - t0),
         "eval": history}, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return history[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=BASE_DIR)
    ap.add_argument("--steps", type=int, default=3600)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=900)
    a = ap.parse_args(argv)
    print(json.dumps(pretrain(a.out, a.steps, a.batch, a.lr, seed=a.seed, eval_every=a.eval_every)))


if __name__ == "__main__":
    main()
