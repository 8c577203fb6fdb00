"""`make bench`: the project's training path against plain HF Trainer and TRL's SFTTrainer on one budget.

Modules: suite (plan, shared data, one subprocess per run), worker (a run: build, train, score), contenders
(the three trainers), runs (budget, shared hyperparameters, token counters), heldout (the one loss every run
is scored with), flops (model FLOPs per token, matmul peak, MFU), profile (where a step's time goes), report.
"""
