"""The scoring script's Batcher (serving/scoring/batching.py): requests that arrive together share a model call.

Here with a model stand-in that records its calls; tests/test_int4.py runs it with the int4 model and
tests/test_endpoint.py through azmlinfsrv.
"""

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "serving" / "scoring"))
from batching import Batcher  # noqa: E402


class Model:
    """Answers each question with its text reversed; fails on "boom"; can be held mid-call."""

    def __init__(self):
        self.calls, self.release = [], threading.Event()
        self.release.set()
        self.in_call = threading.Event()

    def answer(self, texts, params):
        self.calls.append((list(texts), params))
        self.in_call.set()
        self.release.wait()
        if any("boom" in text for text in texts):
            raise ValueError("the model cannot answer 'boom'")
        return [f"{text[::-1]} {params}" for text in texts]


@pytest.fixture
def model():
    return Model()


def ask_together(batcher, requests):
    """Each (texts, params) sent from its own thread at the same moment; the answers or errors, in order."""
    def ask(request):
        try:
            return batcher.ask(*request, timeout_s=30)
        except Exception as error:
            return error

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(ask, requests))


def test_requests_that_arrive_together_share_one_call_and_get_their_own_answers(model):
    batcher = Batcher(model.answer, gather_s=0.2).start()
    greedy = {"do_sample": False}
    answers = ask_together(batcher, [(["ab"], greedy), (["cd", "ef"], greedy), (["gh"], dict(greedy))])
    assert answers == [["ba {'do_sample': False}"], ["dc {'do_sample': False}", "fe {'do_sample': False}"],
                       ["hg {'do_sample': False}"]]
    assert len(model.calls) == 1 and sorted(model.calls[0][0]) == ["ab", "cd", "ef", "gh"]


def test_requests_with_other_params_get_calls_of_their_own_with_their_params(model):
    batcher = Batcher(model.answer, gather_s=0.2).start()
    cold, hot = {"max_new_tokens": 8, "do_sample": False}, {"max_new_tokens": 8, "temperature": 0.7}
    answers = ask_together(batcher, [(["a"], cold), (["b"], hot), (["c"], cold), (["d"], None), (["e"], {})])
    assert answers == [[f"a {cold}"], [f"b {hot}"], [f"c {cold}"], ["d None"], ["e None"]]
    calls = {tuple(sorted(texts)): params for texts, params in model.calls}
    assert set(calls) == {("a", "c"), ("b",), ("d", "e")}  # no params and empty params are the same request
    assert calls[("a", "c")] == cold and calls[("b",)] == hot and calls[("d", "e")] in (None, {})


def test_a_failing_request_fails_alone(model):
    batcher = Batcher(model.answer, gather_s=0.2).start()
    answers = ask_together(batcher, [(["ab"], None), (["boom"], None), (["cd"], None)])
    assert answers[0] == ["ba None"] and answers[2] == ["dc None"]
    assert isinstance(answers[1], ValueError) and str(answers[1]) == "the model cannot answer 'boom'"
    # The shared call failed, then each request was answered on its own.
    assert sorted(sorted(texts) for texts, _ in model.calls) == [["ab"], ["ab", "boom", "cd"], ["boom"], ["cd"]]


def call_under_way(batcher, model, pool, text: str):
    """A request for `text` whose call has begun and holds until model.release is set; its future."""
    model.release.clear()
    future = pool.submit(batcher.ask, [text], None, 30)
    assert model.in_call.wait(10)
    return future


def test_requests_that_come_during_a_call_share_the_next_one(model):
    batcher = Batcher(model.answer, gather_s=0.0).start()
    with ThreadPoolExecutor(4) as pool:
        first = call_under_way(batcher, model, pool, "first")
        later = [pool.submit(batcher.ask, [text], None, 30) for text in ("x", "y", "z")]
        time.sleep(0.3)  # all three are queued behind the call under way
        model.release.set()
        assert first.result() == ["tsrif None"]
        assert [f.result() for f in later] == [["x None"], ["y None"], ["z None"]]
    assert [sorted(texts) for texts, _ in model.calls] == [["first"], ["x", "y", "z"]]


def test_a_call_takes_at_most_max_rows_questions_but_never_splits_a_request(model):
    batcher = Batcher(model.answer, gather_s=0.2, max_rows=3).start()
    answers = ask_together(batcher, [(["a", "b"], None), (["c", "d"], None), (["e", "f", "g", "h"], None)])
    assert answers == [["a None", "b None"], ["c None", "d None"], ["e None", "f None", "g None", "h None"]]
    assert sorted(len(texts) for texts, _ in model.calls) == [2, 2, 4]


def test_a_request_that_waits_too_long_times_out_and_is_never_answered(model):
    batcher = Batcher(model.answer, gather_s=0.0).start()
    with ThreadPoolExecutor(2) as pool:
        running = call_under_way(batcher, model, pool, "long")
        with pytest.raises(TimeoutError):
            batcher.ask(["given up"], None, 0.2)
        model.release.set()
        assert running.result() == ["gnol None"]
    assert batcher.ask(["next"], None, 10) == ["txen None"]
    assert [texts for texts, _ in model.calls] == [["long"], ["next"]]  # "given up" never reached the model
