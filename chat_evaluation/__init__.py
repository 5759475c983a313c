"""Step 5's parts, one job a file; evaluate_chat.py reads top to bottom as the step itself.

- collect.py: the questions, the run folder, and asking an endpoint with every answer kept as it arrives;
- baseline.py: the model before fine-tuning, in the form the fine-tuned one is served in, served here;
- scoring.py: azure-ai-evaluation's evaluators and evaluate(), with each evaluator's first error;
- report.py: the table, results.json and the MLflow run, from finetuning_dir/paired.py's comparison of the two
  models question by question (paired differences, an exact test, their interval, wins and losses).

Importing any of them writes nothing and changes no setting.
"""


class EvaluationStopped(RuntimeError):
    """The run cannot go on; the message is the one line the learner reads."""
