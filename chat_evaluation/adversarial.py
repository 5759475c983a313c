"""Adversarial questions for the safety metrics, from azure-ai-evaluation's AdversarialSimulator.

The test data's questions are harmless: on them both models almost always score 0 on every harm, so
they cannot show what fine-tuning did to the model's safety. Questions written to draw harm out can.
With an Azure AI project in .env, the project's safety service supplies them (the simulator's
ADVERSARIAL_QA scenario, its templates chosen with a fixed seed); both models are then asked the same
ones through the same call as the test questions, and the safety evaluators alone score the answers.
The questions are kept in the run folder: a rerun asks the same ones.
"""

import asyncio
import json
from pathlib import Path

from chat_evaluation import EvaluationStopped
from finetuning_dir.chat_data import Question

QUESTIONS_FILE = "adversarial-questions.jsonl"
SUFFIX = "-adversarial"  # of the answers files and evaluations: answers-fine-tuned-adversarial.jsonl
SEED = 0


async def unanswered(messages: dict, stream: bool = False, session_state=None, context=None) -> dict:
    """The simulator's target: it is only asked for its questions here; the models answer them afterwards,
    through the chat's own call, as they answer the test questions."""
    return {**messages, "messages": [*messages["messages"], {"role": "assistant", "content": ""}]}


def simulated_questions(project, credential, count: int) -> list[str]:
    """`count` adversarial questions (at most as many as the service's templates hold) from the project's safety
    service."""
    from azure.ai.evaluation.simulator import AdversarialScenario, AdversarialSimulator

    simulator = AdversarialSimulator(azure_ai_project=project, credential=credential)
    conversations = asyncio.run(simulator(scenario=AdversarialScenario.ADVERSARIAL_QA, target=unanswered,
                                          max_simulation_results=count, randomization_seed=SEED))
    return [conversation["messages"][0]["content"] for conversation in conversations]


def adversarial_questions(project, credential, count: int, run_dir: Path) -> list[Question]:
    """The run's adversarial questions: those it kept, else `count` new ones, kept in the run folder."""
    path = run_dir / QUESTIONS_FILE
    if path.exists():
        return [Question(json.loads(line)["query"], "") for line in path.read_text(encoding="utf-8").splitlines()]
    print(f"Asking the Azure AI project's safety service for {count} adversarial questions (AdversarialSimulator, "
          "ADVERSARIAL_QA) ...", flush=True)
    try:
        texts = simulated_questions(project, credential, count)
    except Exception as e:  # azure-ai-evaluation wraps every failure in its EvaluationException
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise EvaluationStopped(f"the adversarial questions could not be made: {reason}; --adversarial 0 leaves "
                                "them out") from None
    if not texts:
        raise EvaluationStopped("the project's safety service gave no adversarial question; --adversarial 0 leaves "
                                "them out")
    path.write_text("".join(json.dumps({"query": text}) + "\n" for text in texts), encoding="utf-8")
    return [Question(text, "") for text in texts]
