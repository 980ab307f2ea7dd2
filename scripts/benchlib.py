"""What the benchmark scripts share: the processor's name, medians with their range, and
writing a result section into docs/benchmarks.md."""
import os
import re
import statistics


def cpu_model():
    """The processor's model name from /proc/cpuinfo ("unknown" without one)."""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def spread(values, digits=1, scale=1.0):
    """'median (min-max)' of values times scale."""
    values = [v * scale for v in values]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def section_text(name, lines):
    """The lines framed by the "<!-- NAME: start -->" and "<!-- NAME: end -->" markers."""
    return "\n".join([f"<!-- {name}: start -->", *lines, f"<!-- {name}: end -->"]) + "\n"


def print_section(name, lines):
    print(section_text(name, lines))


def write_section(root, name, lines):
    """Puts the section into docs/benchmarks.md: in place of the section of that name, else at
    the end."""
    section = section_text(name, lines)
    path = os.path.join(root, "docs/benchmarks.md")
    text = open(path).read()
    if f"<!-- {name}: start -->" in text:
        pattern = re.escape(f"<!-- {name}: start -->") + ".*?" + re.escape(f"<!-- {name}: end -->") + "\n"
        text = re.sub(pattern, lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    open(path, "w").write(text)

