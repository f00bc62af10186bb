"""What `esper train` prints: the epoch line and the summary table, a guarded task included."""

from __future__ import annotations

from commands.train import _epoch_line, _render

RECORD = {"train_loss": 0.5, "validation_loss": 0.25, "validation_accuracy": 0.9,
          "stages_after": {"DORMANT": 3, "GRAFTING": 1}}
GUARD = {"metric": "accuracy", "reference": 0.651, "value": 0.629}


def test_the_epoch_line_shows_the_guarded_task_when_there_is_one():
    plain = _epoch_line(RECORD, 3, 10)
    assert plain == "epoch 3/10  loss 0.5000  val_loss 0.2500  val_acc 0.9000  seeds GRAFTING:1"
    guarded = _epoch_line({**RECORD, "guard": {**GUARD, "without": {}}}, 3, 10)
    assert guarded == ("epoch 3/10  loss 0.5000  val_loss 0.2500  val_acc 0.9000  guard 0.6290  "
                       "seeds GRAFTING:1")


def test_the_summary_table_has_a_guard_row_only_for_a_guarded_run(capsys):
    summary = {"run_id": "r", "status": "completed", "validation_accuracy": 0.9, "guard": None}
    _render(summary)
    assert "guarded task" not in capsys.readouterr().out
    _render({**summary, "guard": GUARD})
    out = capsys.readouterr().out
    assert "guarded task accuracy" in out and "0.651 -> 0.629" in out
    lines = out.splitlines()
    row = next(i for i, line in enumerate(lines) if "guarded task" in line)
    assert "validation accuracy" in lines[row - 1]
