"""The training step's shortcuts give the numbers of the plain computation: logits at scored positions only,
recall binned by key-to-query distance, and a loop that reads the device back only now and then."""

from __future__ import annotations

import torch
from tiny import tiny_config

from palimpsa.config import config_from_dict
from palimpsa.model import build_model
from palimpsa.tasks import IGNORE_INDEX, MQARConfig, generate_mqar
from palimpsa.tasks.metrics import gap_bin, query_distances, recall_by_gap
from palimpsa.training import masked_cross_entropy, scored_positions


def mqar_batch(n: int = 8):
    cfg = MQARConfig(vocab_size=32, seq_len=32, num_kv_pairs=4, num_train=n, num_val=1)
    return generate_mqar(cfg, n, torch.Generator().manual_seed(0))


def test_scored_position_loss_and_gradients_equal_the_full_masked_loss() -> None:
    inputs, targets = mqar_batch()
    positions = scored_positions(targets)
    assert positions is not None and positions.shape == (8, 4)
    torch.manual_seed(0)
    model = build_model(config_from_dict(tiny_config(task={"vocab_size": 32, "seq_len": 32}))).double()
    full_total, full_count = masked_cross_entropy(model(inputs), targets)
    (full_grad,) = torch.autograd.grad(full_total, model.embed.weight)
    part_total, part_count = masked_cross_entropy(
        model(inputs, positions=positions), targets.gather(1, positions)
    )
    (part_grad,) = torch.autograd.grad(part_total, model.embed.weight)
    assert int(full_count) == int(part_count) == 32
    torch.testing.assert_close(part_total, full_total, rtol=1e-12, atol=0)
    torch.testing.assert_close(part_grad, full_grad, rtol=1e-10, atol=1e-14)


def test_scored_positions_only_when_every_row_scores_the_same_count() -> None:
    targets = torch.full((2, 6), IGNORE_INDEX)
    targets[0, 1], targets[1, 4] = 3, 5
    assert scored_positions(targets).tolist() == [[1], [4]]
    targets[1, 2] = 7  # rows now score 1 and 2 positions
    assert scored_positions(targets) is None
    assert scored_positions(torch.zeros(2, 6, dtype=torch.long)) is None  # every position scored (LM)


def test_query_distances_find_the_key_in_the_context() -> None:
    inputs, targets = mqar_batch()
    positions = scored_positions(targets)
    distances = query_distances(inputs, positions, block=3)  # blocks smaller than the batch
    for n in range(inputs.shape[0]):
        for s, p in enumerate(positions[n].tolist()):
            key = int(inputs[n, p])
            first = inputs[n].tolist().index(key)
            assert first < 8 and first % 2 == 0  # keys sit at the even context positions
            assert int(distances[n, s]) == p - first


def test_recall_by_gap_bins() -> None:
    assert [gap_bin(d) for d in (1, 2, 3, 4, 7, 8, 100)] == [
        "1-1",
        "2-3",
        "2-3",
        "4-7",
        "4-7",
        "8-15",
        "64-127",
    ]
    correct = torch.tensor([[True, False, True, True]])
    distances = torch.tensor([[2, 3, 9, -1]])  # -1: no earlier occurrence, left out
    assert recall_by_gap(correct, distances) == {"recall_gap.2-3": 0.5, "recall_gap.8-15": 1.0}


def test_compiled_and_eager_steps_give_the_same_losses(tmp_path) -> None:
    """torch.compile of the model's torch parts (the ops run as they are) trains the same steps."""
    from palimpsa.training import Trainer

    losses = {}
    for compile_ in (False, True):
        raw = tiny_config(train={"compile": compile_, "num_threads": 1}, tracking={"enabled": False})
        trainer = Trainer(config_from_dict(raw), tmp_path / str(compile_))
        batches = trainer.train_batches.from_step(0)
        losses[compile_] = [float(trainer.train_step(*next(batches))[0]) for _ in range(3)]
        if compile_:
            assert trainer.net.status == "compiled"
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
