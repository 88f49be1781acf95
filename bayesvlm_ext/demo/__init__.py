"""The demo and what it runs on: the package's own data and model (nothing is downloaded).

- `shapes`: images of coloured shapes with captions ("a small red triangle on the left"), a shifted domain
  and a word-level tokenizer;
- `default_model`: a tiny open_clip CLIP trained contrastively on them (its weights ship with the package);
- `run`: `python -m bayesvlm_ext.demo` (`make demo`), BayesVLM and ProbVLM on that model;
- `plots`: its figures (reliability diagrams, Recall@1 per uncertainty bin, risk-coverage, active learning);
- `active_protocol` (active learning on a mixed-domain pool), `probvlm_seeds` (ProbVLM's settings chosen on
  a validation split, then several seeds), `selective` (selective prediction), `common` (what they share).

Not imported by `import bayesvlm_ext`: the library does not depend on its own demo.
"""
