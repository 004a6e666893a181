"""Solution plans: one plan renders as a sequential CoT and as a parallel CoT with identical content.

A plan is a list of steps; a step is either plain lines or a fork of independent groups. A fork
of k ≥ 2 groups becomes a ``<Parallel>`` block (outline = group label, thread = group lines) in
the parallel CoT and the groups' lines one after another in the sequential CoT; a fork of one
group stays sequential in both (the paper trains *when* to fork from such mixtures).

>>> p = Plan(steps=(Fork((Group("A", ("A=1+2", "=3")), Group("B", ("B=4",)))), ("A+B", "=7")), answer="7")
>>> print(p.sequential_text())
<think>
A=1+2
=3
B=4
A+B
=7
</think>
<BLANKLINE>
\\boxed{7}
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import format as fmt


@dataclass(frozen=True)
class Group:
    """An independent sub-computation: its outline label and its reasoning lines."""
    label: str
    lines: tuple[str, ...]


@dataclass(frozen=True)
class Fork:
    groups: tuple[Group, ...]


Step = Fork | tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    answer: str

    def _final(self) -> str:
        return f"{fmt.THINK_CLOSE}\n\n{fmt.BOXED}{self.answer}}}"

    def sequential_text(self) -> str:
        lines: list[str] = []
        for step in self.steps:
            if isinstance(step, Fork):
                for g in step.groups:
                    lines.extend(g.lines)
            else:
                lines.extend(step)
        return f"{fmt.THINK_OPEN}\n" + "".join(line + "\n" for line in lines) + self._final()

    def parallel_trajectory(self) -> fmt.Trajectory:
        items: list[fmt.Text | fmt.Block] = []
        text = f"{fmt.THINK_OPEN}\n"
        for step in self.steps:
            if isinstance(step, Fork) and len(step.groups) >= 2:
                items.append(fmt.Text(text))
                items.append(fmt.Block.from_plan([g.label for g in step.groups],
                                                 ["\n".join(g.lines) for g in step.groups]))
                text = "\n"
            else:
                lines = [ln for g in step.groups for ln in g.lines] if isinstance(step, Fork) else list(step)
                text += "".join(line + "\n" for line in lines)
        items.append(fmt.Text(text + self._final()))
        return fmt.Trajectory(tuple(items))

    def parallel_text(self) -> str:
        return self.parallel_trajectory().render()

    def coarsened(self) -> "Plan":
        """The same plan with neighbouring groups of every fork of 3+ groups paired into one thread.

        Same lines, fewer and longer threads: a longer critical path for the same work (a 4-group
        fork becomes 2 threads of two groups). Forks of 2 groups stay as they are.

        >>> g = [Group(x, (x.lower(),)) for x in "ABC"]
        >>> [x.label for x in Plan((Fork(tuple(g)),), "1").coarsened().steps[0].groups]
        ['A B', 'C']
        """
        steps: list[Step] = []
        for step in self.steps:
            if isinstance(step, Fork) and len(step.groups) >= 3:
                pairs = [step.groups[i:i + 2] for i in range(0, len(step.groups), 2)]
                step = Fork(tuple(Group(" ".join(g.label for g in pair), tuple(ln for g in pair for ln in g.lines))
                                  for pair in pairs))
            steps.append(step)
        return Plan(tuple(steps), self.answer)

    @property
    def max_threads(self) -> int:
        return max([len(s.groups) for s in self.steps if isinstance(s, Fork)] or [1])
