"""The README's promises that code can check: its two set-up commands and the optimizer names it lists."""

from pathlib import Path

from archopt_plugins import available_optimizers

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_readme_gives_the_two_commands_for_a_fresh_machine():
    block = README.split("```", 2)[1]  # the first code block
    commands = [line.split("#")[0].strip() for line in block.splitlines()[1:] if line.strip()]
    assert commands == ["make quickstart", "make test"]


def test_readme_lists_every_available_optimizer():
    lines = README[README.index("print(ao.available_optimizers())"):].splitlines()
    # the print's own comment and the comment-only lines that continue it
    comments = [lines[0].split("#", 1)[1]]
    comments += [line.strip()[1:] for line in lines[1:3] if line.strip().startswith("#")]
    listed = " ".join(comments).split()
    assert listed == available_optimizers()
