"""What a run is judged by: eval, the forgetting monitor, the teacher gate, `sdft compare`."""
