"""What every refusal in the reliability suite must look like."""

from __future__ import annotations


def refused(result, *names: str) -> str:  # noqa: ANN001  (a typer.testing Result)
    """Exit 1 with one `error:` message naming each of `names`, and no traceback; returns the output."""
    out = result.output
    assert result.exit_code == 1, out
    assert "error:" in out and "Traceback" not in out, out
    for name in names:
        assert name in out, (name, out)
    return out
