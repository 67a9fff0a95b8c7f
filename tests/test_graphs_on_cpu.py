"""The CUDA-graph bookkeeping on the CPU: ``GraphRunner``'s capture once per key, replay,
least-recently-used cap and drop on new weights, and the Dehazer's use of it (outputs equal
the eager run; a result survives the next replay; tiles share a graph; eta > 0 runs eager);
``GraphedTrainingStep``'s undoing of its warm-up steps and its recapture on a new shape.

CUDA's graph API is replaced by stand-ins that keep what a capture and a replay promise: a
capture computes nothing that stays (``fake_train_graphs`` puts back every weight, buffer
and optimizer state the traced step touched); a replay runs the captured work again on the
static input buffers the capture saw and writes into the static outputs it returned.
Real graphs on a GPU, including the weights they read at their capture addresses, are
checked in ``tests/test_cuda_fast.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsrdmpd import cuda_graphs
from dsrdmpd.builders import build_stage1, build_stage2
from dsrdmpd.cuda_graphs import GraphRunner
from dsrdmpd.inference import Dehazer
from dsrdmpd.training import step_options
from dsrdmpd.training.step_options import GraphedTrainingStep, StepOptions, make_adam


class FakeGraph:
    """A replay runs the captured ``body`` again and copies its tensors into the static
    outputs, in place (as a real replay rewrites its pool); ``replays`` counts them."""

    def __init__(self, body, outputs):
        self.body, self.outputs, self.replays = body, outputs, 0

    def replay(self):
        fresh = self.body()
        for static, new in zip(self.outputs, fresh):
            static.copy_(new)
        self.replays += 1


@pytest.fixture
def fake_graphs(monkeypatch):
    """CUDA's graph calls in ``dsrdmpd.cuda_graphs`` replaced by CPU stand-ins (the capture
    runs the pure function once, for its output shapes); returns the list of FakeGraphs
    recorded."""
    recorded = []

    def record(body):
        outputs = tuple(t.clone() for t in body())     # the capture's own, fresh tensors
        graph = FakeGraph(body, outputs)
        recorded.append(graph)
        return graph, outputs

    monkeypatch.setattr(cuda_graphs, "require_cuda", lambda tensors: None)
    monkeypatch.setattr(cuda_graphs, "warm_up", lambda body, times: [body() for _ in range(times)])
    monkeypatch.setattr(cuda_graphs, "record", record)
    return recorded


def _models(seed=0):
    torch.manual_seed(seed)
    return build_stage1({"dim": 32}), build_stage2({"dim": 16})


def _graphed(d: Dehazer, max_graphs=4) -> Dehazer:
    """``d`` with the runner ``Dehazer(cuda_graphs=True)`` makes on a CUDA device (no
    warm-up calls: the stand-in chooses no kernels)."""
    d.graphs = d._graph_runner(max_graphs, warmup=0)
    return d


def test_a_runner_refuses_cpu_tensors_and_a_cap_below_one():
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors"):
        GraphRunner(lambda x: (x,))(torch.zeros(1))
    with pytest.raises(ValueError, match="max_graphs must be at least 1"):
        GraphRunner(lambda x: (x,), max_graphs=0)


def test_replay_computes_from_each_call_s_inputs_and_keeps_earlier_results(fake_graphs):
    runner = GraphRunner(lambda x, n: (x * 2 + n, x - n))
    calls = [(torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)) for _ in range(3)]
    outs = [runner(x, n) for x, n in calls]
    assert runner.captures == 1 and fake_graphs[0].replays == 3
    for (x, n), (a, b) in zip(calls, outs):                   # each result still its own call's
        assert torch.equal(a, x * 2 + n) and torch.equal(b, x - n)


def test_one_graph_per_key_least_recently_used_dropped(fake_graphs):
    runner = GraphRunner(lambda x: (x + 1,), max_graphs=2)
    a, b, c = torch.zeros(1, 2), torch.zeros(2, 2), torch.zeros(3, 2)
    for t in (a, b, a, c):                                    # a used after b: b is the oldest at c
        runner(t)
    assert runner.captures == 3 and len(runner.graphs) == 2
    runner(a)
    assert runner.captures == 3                               # a kept
    runner(b)
    assert runner.captures == 4                               # b was dropped
    runner(a, extra="other")                                  # the caller's key part counts
    assert runner.captures == 5


def test_new_weights_drop_every_graph(fake_graphs):
    net = torch.nn.Linear(3, 2)
    runner = GraphRunner(lambda x: (net(x),), (net,), max_graphs=4)
    x, y = torch.rand(4, 3), torch.rand(5, 3)
    runner(x), runner(y)
    assert runner.captures == 2
    with torch.no_grad():
        net.weight.add_(1.0)                                  # an in-place update (an optimizer step)
    out, = runner(x)
    assert runner.captures == 3 and len(runner.graphs) == 1
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    net.load_state_dict(torch.nn.Linear(3, 2).state_dict())   # copied into the same tensors
    runner(x)
    assert runner.captures == 4


def test_dehazer_replay_equals_the_eager_run(fake_graphs):
    s1, s2 = _models()
    eager = Dehazer(s1, s2)
    d = _graphed(Dehazer(s1, s2), max_graphs=2)
    images = [torch.rand(2, 3, 64, 80), torch.rand(1, 3, 80, 64), torch.rand(2, 3, 64, 80)]
    kept = []
    for hazy in images:
        out, ref = d(hazy), eager(hazy)
        assert torch.equal(out.restored, ref.restored) and torch.equal(out.coarse, ref.coarse)
        kept.append((out.restored, ref.restored))
    assert d.graphs.captures == 2                             # the first size replayed for the third call
    for out, ref in kept:                                     # no result overwritten by a later replay
        assert torch.equal(out, ref)


def test_dehazer_key_holds_the_sampling_steps(fake_graphs):
    s1, s2 = _models()
    d = _graphed(Dehazer(s1, s2))
    hazy = torch.rand(1, 3, 64, 64)
    d(hazy)
    d.steps = 2
    assert torch.equal(d(hazy).restored, Dehazer(s1, s2, steps=2)(hazy).restored)
    assert d.graphs.captures == 2


def test_dehazer_new_weights_are_used_at_once(fake_graphs):
    s1, s2 = _models()
    d = _graphed(Dehazer(s1, s2))
    hazy = torch.rand(1, 3, 64, 64)
    d(hazy)
    _, s2b = _models(seed=1)
    d.stage2.load_state_dict(s2b.state_dict())
    assert torch.equal(d(hazy).restored, Dehazer(s1, s2b)(hazy).restored)
    assert d.graphs.captures == 2


def test_dehazer_swapped_stage_is_captured_anew(fake_graphs):
    """``dehazer.stage2 = other``: the runner asks the Dehazer for its networks before each
    call, so the swap drops the graphs that read the old stage."""
    s1, s2 = _models()
    d = _graphed(Dehazer(s1, s2))
    hazy = torch.rand(1, 3, 64, 64)
    d(hazy)
    _, other = _models(seed=1)
    d.stage2 = other.eval()
    assert torch.equal(d(hazy).restored, Dehazer(s1, other)(hazy).restored)
    assert d.graphs.captures == 2


def test_tiles_of_a_scene_share_one_graph_and_eta_runs_eager(fake_graphs):
    s1, s2 = _models()
    scene = torch.rand(1, 3, 96, 96)
    opts = dict(tile=64, overlap=32, tile_batch=2)
    d = _graphed(Dehazer(s1, s2, **opts))
    assert torch.equal(d(scene).restored, Dehazer(s1, s2, **opts)(scene).restored)
    assert d.graphs.captures == 1 and fake_graphs[0].replays == 2      # 4 tiles, 2 calls of 2
    stochastic = _graphed(Dehazer(s1, s2, eta=0.5))
    assert torch.equal(stochastic(scene[..., :64, :64]).restored, Dehazer(s1, s2, eta=0.5)(scene[..., :64, :64]).restored)
    assert stochastic.graphs.captures == 0                    # host-side randomness: never captured


# --- the captured training step ---------------------------------------------------------

def _adam(net):
    """The Adam ``train.cuda_graph`` makes (learning rate a tensor, ``capturable`` set)."""
    return make_adam(net.parameters(), 1e-2, StepOptions(cuda_graph=True), torch.device("cpu"))


def _run_plain(optimizer):
    """``optimizer`` switched to PyTorch's plain Adam path: capturable Adam refuses CPU tensors."""
    for g in optimizer.param_groups:
        g["capturable"] = False
    return optimizer


@pytest.fixture
def fake_train_graphs(monkeypatch):
    """Stand-ins for the captured training step, for one (model, optimizer) at a time: the
    capture traces the step and puts back what it changed; a replay is a fresh step whose
    gradients start from none (a real replay writes them, it does not add to them)."""
    def use(model, optimizer):
        def record(body):
            tensors = lambda: ([*model.parameters(), *model.buffers()]            # noqa: E731
                               + [t for st in optimizer.state.values() for t in st.values()
                                  if isinstance(t, torch.Tensor)])
            before = [(t, t.detach().clone()) for t in tensors()]
            loss = body().detach().clone()
            with torch.no_grad():
                for t, old in before:
                    t.copy_(old)
            optimizer.zero_grad(set_to_none=True)
            return FakeTrainGraph(body, optimizer, loss), loss
        monkeypatch.setattr(step_options, "record", record)
        monkeypatch.setattr(step_options, "warm_up", lambda body, times: [body() for _ in range(times)])
        step = GraphedTrainingStep(lambda x, y: F.l1_loss(model(x), y), model, optimizer)
        _run_plain(optimizer)                          # after the step's capturable check
        return step
    return use


class FakeTrainGraph:
    def __init__(self, body, optimizer, loss):
        self.body, self.optimizer, self.loss = body, optimizer, loss

    def replay(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.loss.copy_(self.body().detach())


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Conv2d(4, 3, 1)).train()


def _batches(shapes):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(*s, generator=g), torch.rand(*s, generator=g)) for s in shapes]


def test_graphed_step_equals_eager_steps_warm_up_undone_and_recaptured_per_shape(fake_train_graphs):
    """Steps through the captured step (3 warm-up steps per capture, undone) equal plain
    eager steps bit for bit: weights, BatchNorm statistics, Adam's state and the losses;
    a new input shape captures again, with the state the earlier steps left."""
    eager, graphed = _net(), _net()
    batches = _batches([(2, 3, 8, 8)] * 3 + [(1, 3, 12, 8)] * 2 + [(2, 3, 8, 8)])
    opt_e = _run_plain(_adam(eager))
    ref = []
    for x, y in batches:
        opt_e.zero_grad(set_to_none=True)
        loss = F.l1_loss(eager(x), y)
        loss.backward()
        opt_e.step()
        ref.append(loss.detach())
    opt_g = _adam(graphed)
    step = fake_train_graphs(graphed, opt_g)
    got = [step(x, y) for x, y in batches]
    assert step.captures == 3
    assert torch.equal(torch.stack(got), torch.stack(ref))
    for a, b in zip([*graphed.parameters(), *graphed.buffers()], [*eager.parameters(), *eager.buffers()]):
        assert torch.equal(a, b)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_g.state[p][k], opt_e.state[q][k]), k


def test_graphed_step_refuses_an_optimizer_that_is_not_capturable():
    net = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedTrainingStep(lambda x: net(x).sum(), net, torch.optim.Adam(net.parameters()))
