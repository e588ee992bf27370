"""The README's example for practitioners runs as written (its code blocks, in order, in one namespace)."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_own_training_loop_example_runs(capsys):
    blocks = _section_code("Use gradstab in your own training loop")
    assert len(blocks) == 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the README's own example
    out = capsys.readouterr().out
    assert "non-finite" not in out  # a healthy run: the check did not fire
    assert namespace["monitor"].history().shape[0] == namespace["step"] + 1  # one row per step taken
    assert namespace["history"].steps == 40 and not namespace["history"].diverged
    assert "remedy" in out.lower()
