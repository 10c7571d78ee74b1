"""Evaluation harness: the paper's protocol (`logo run`), baselines, comparison and an lm-eval backend.

- ``datasets`` / ``hub``: the 26 datasets, their metrics, sources and the official prompt format;
- ``metrics``: EM, multi-answer EM, BLEU-4 and ROUGE as the official code computes them;
- ``methods`` / ``arrow``: LoGo's baselines (base, uniform, random, fixed:NAME) and PEFT's Arrow router;
- ``runner`` / ``records``: the batched, resumable run loop and its official output files;
- ``compare``: methods x datasets tables and the selection heatmap;
- ``lm_eval_backend``: an lm-evaluation-harness ``LM`` routed with LoGo (optional extra);
- ``cli``: the ``logo run`` and ``logo compare`` commands.
"""
