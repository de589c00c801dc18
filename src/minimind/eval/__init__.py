"""Evaluation: bits-per-byte on held-out text, task accuracy with checkable answers.

* :mod:`minimind.eval.bpb` -- bits per UTF-8 byte and perplexity (packed shards, or any pretrain
  JSONL with a sliding window for long documents);
* :mod:`minimind.eval.mc` -- multiple choice (C-Eval / CMMLU CSV, JSONL): answer-letter and
  length-normalised choice log-likelihood, zero- or k-shot;
* :mod:`minimind.eval.math` -- GSM8K-style generation: final-number extraction, accuracy, pass@k;
* :mod:`minimind.eval.tasks` -- the demo's generated tasks with their own checkers;
* :mod:`minimind.eval.results` / :mod:`minimind.eval.cli` -- the JSON results format, the table on
  screen and ``minimind eval bpb|mc|math``; :mod:`minimind.eval.loading` -- ``--model`` as a weights
  file, stage name or Hugging Face folder.

Submodules are imported on use, so ``import minimind.eval`` stays light.
"""
