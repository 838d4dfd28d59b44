"""SeqTR (ECCV 2022): visual grounding as coordinate-token sequences; see docs/SEQTR.md."""
