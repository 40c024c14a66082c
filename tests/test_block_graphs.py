"""The joint blocks replayed per class count (pipeline/dusa/block_graphs.py) compute what the eager blocks
compute: outputs, the gradients of their inputs and of every parameter, window after window, over class
counts that are captured, replayed, evicted and run eagerly. On a CPU the chain's recorder re-runs the
recorded functions (its static buffers, their sharing between forms and the autograd wiring are the same);
on a GPU the same test replays real CUDA graphs."""
from __future__ import annotations

import copy

import pytest
import torch

from models.sd3 import TransformerParts
from models.tiny import make_tiny_sd3
from pipeline.dusa.block_graphs import EagerRecorder
from pipeline.dusa.layers import JointBlock, chain_joint_blocks, pack, unpack

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def blocks_of(folder, device) -> list[JointBlock]:
    parts = TransformerParts(str(folder))
    return [JointBlock(parts.load(f"transformer_blocks.{i}")).to(device) for i in range(parts.num_blocks)]


def window(layers, n: int, seed: int, device, frozen_input: bool = False):
    """One window through the layers (as the pipeline runs them): outputs, input and parameter gradients."""
    g = torch.Generator().manual_seed(seed)
    hidden, context, temb = (torch.randn(n, 16, 16, generator=g), torch.randn(n, 12, 16, generator=g),
                             torch.randn(n, 16, generator=g))
    leaves = [t.to(device).requires_grad_(not (frozen_input and i == 0)) for i, t in enumerate((hidden, context, temb))]
    acts = pack(*leaves)
    for layer in layers:
        acts = layer(acts)
    out = unpack(acts)
    (out[0].square().mean() + out[1].sin().sum()).backward()  # temb passes through: its gradient sums both
    grads = [t.grad for t in leaves]
    params = [None if p.grad is None else p.grad.clone() for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    return [o.detach().clone() for o in out[:1]], grads, params


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_blocks_equal_eager_over_class_counts(tmp_path, device):
    make_tiny_sd3(tmp_path / "sd3", num_layers=3)  # the last block has no text stream
    eager = blocks_of(tmp_path / "sd3", device)
    graphed = copy.deepcopy(eager)
    chain = chain_joint_blocks(graphed, max_forms=2, max_classes=4,
                               recorder=EagerRecorder() if device == "cpu" else None)
    assert chain is not None and [b.chain_index for b in graphed] == [0, 1, 2]
    # 2: eager, captured, replayed; 3 the same; 1 is seen once (eager) and 5 is above max_classes (eager).
    counts = [2, 2, 3, 2, 3, 3, 1, 5, 2]
    for step, n in enumerate(counts):
        a, b = window(eager, n, step, device), window(graphed, n, step, device)
        for i, (x, y) in enumerate(zip([*a[0], *a[1], *a[2]], [*b[0], *b[1], *b[2]])):
            assert (x is None) == (y is None)
            if x is not None:  # temb's gradient: the same terms, summed per block first (a last-bit difference)
                tolerance = dict(rtol=1e-6, atol=1e-7) if i == 3 else dict(rtol=0, atol=0)
                torch.testing.assert_close(y, x, **tolerance)
    stats = chain.stats
    assert (stats.captures, stats.hits, stats.evictions) == (2, 3, 0)
    assert stats.calls == len(counts) - 1  # 5 classes: more than the buffers hold, eager without a visit


def test_a_frozen_chain_runs_eagerly_and_a_block_out_of_order_is_refused(tmp_path):
    make_tiny_sd3(tmp_path / "sd3", num_layers=2)
    layers = blocks_of(tmp_path / "sd3", "cpu")
    chain = chain_joint_blocks(layers, max_forms=4, max_classes=4, recorder=EagerRecorder())
    for p in (p for layer in layers for p in layer.parameters()):
        p.requires_grad_(False)
    x = [torch.randn(2, 16, 16), torch.randn(2, 12, 16), torch.randn(2, 16)]
    for _ in range(3):  # nothing to differentiate: no backward to graph
        acts = pack(*x)
        for layer in layers:
            acts = layer(acts)
    assert chain.stats.calls == 0 and not chain.forms
    for p in (p for layer in layers for p in layer.parameters()):
        p.requires_grad_(True)
    for _ in range(2):  # captured on the second window
        window(layers, 2, 0, "cpu")
    acts = layers[0](pack(*(t.clone().requires_grad_(True) for t in x)))
    layers[1](acts)
    with pytest.raises(RuntimeError, match=r"^joint block 1 ran out of order \(expected 2\)"):
        layers[1](acts)
    # Two windows in flight (a forward replayed before the previous one's backward): refused at the backward.
    first = unpack(layers[1](layers[0](pack(*(t.clone().requires_grad_(True) for t in x)))))[0]
    layers[1](layers[0](pack(*(t.clone().requires_grad_(True) for t in x))))
    with pytest.raises(RuntimeError, match="replayed again before the backward of the previous one"):
        first.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", [None, "math"])
def test_compiled_blocks_are_what_the_chain_records(tmp_path, device, capsys, monkeypatch, attention):
    """pipeline.compile_blocks with the graphs: every window runs the compiled forward, at the counts the chain
    replays too (its first window, the capture's runs, and on a CPU the recorder's re-runs; on a GPU real CUDA
    graphs of the compiled code), and every window computes what the eager blocks compute, under torch's
    attention order or a chosen one. The backend here records the graphs dynamo hands it and runs them as they
    are (the runs use inductor)."""
    from pipeline.dusa.layers import attention_order
    make_tiny_sd3(tmp_path / "sd3", num_layers=2)
    eager = blocks_of(tmp_path / "sd3", device)
    order = attention_order(attention) if attention else None
    for layer in eager:
        layer.attention = order
    compiled_graphs, calls = [], [0]

    def recording_backend(gm, example_inputs):
        compiled_graphs.append(gm)

        def run(*args):
            calls[0] += 1
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    monkeypatch.setattr(JointBlock, "compile_announced", False)
    layers = [JointBlock(copy.deepcopy(layer.block), compile_backend=recording_backend, attention=order)
              for layer in eager]
    assert all(layer.compiled for layer in layers)
    assert [k for k, _ in layers[0].named_parameters()] == [k for k, _ in eager[0].named_parameters()]
    chain = chain_joint_blocks(layers, max_forms=2, max_classes=3, recorder=EagerRecorder() if device == "cpu" else None)
    capsys.readouterr()
    counts = [2, 2, 2, 5, 5, 2]  # 2: unreplayed, then captured, then replayed twice; 5: above max_classes
    for step, n in enumerate(counts):
        before = calls[0]
        a, b = window(eager, n, step, device), window(layers, n, step, device)
        if step <= 1 or device == "cpu" or n > 3:  # a GPU's replays call no Python
            assert calls[0] > before, step
        for i, (x, y) in enumerate(zip([*a[0], *a[1], *a[2]], [*b[0], *b[1], *b[2]])):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)
    assert (chain.stats.captures, chain.stats.hits) == (1, 2)
    assert len(compiled_graphs) <= 6  # the class count is dynamic: no graph per count
    said = capsys.readouterr().out.splitlines()  # the first window waits for the compiler: said once, up front
    assert [line for line in said if "compiling" in line] == [
        "compiling the joint blocks (torch.compile: about 35 s on a first run, seconds from torch's cache under /tmp "
        "later; --pipeline.compile_blocks false: eager)"]
