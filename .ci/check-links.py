#!/usr/bin/env python3
"""Check the relative links of the repository's Markdown files (README.md, docs/*.md, ...).

Every link that is not a URL (http:, https:, mailto:) must name a file or directory that exists,
relative to the file the link is in, and a `#fragment` must be one of the target's headings as
GitHub renders them (lower case, punctuation dropped, spaces as hyphens, `-1`, `-2` for repeats).
Links inside code (fenced blocks, `inline code`) are not links. External URLs are not fetched:
CI may have no network, and they are not this repository's to keep.

    python3 .ci/check-links.py             # the repository's Markdown files; exit 1 on a broken link
    python3 .ci/check-links.py FILE.md ... # these files
    python3 .ci/check-links.py --self-test # the checker's own tests
"""

import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# [text](target) or [text](target "title"); the text may hold `code` and nested brackets one deep.
INLINE = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# [label]: target
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "target"]
        for name in sorted(filenames):
            if name.endswith(".md"):
                yield os.path.join(dirpath, name)


def prose_lines(text):
    """(line number, line) for lines outside fenced code blocks, inline code blanked out."""
    fence = None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if marker:
            if fence is None:
                fence = marker.group(1)[0] * len(marker.group(1))
                continue
            if stripped.startswith(fence):
                fence = None
                continue
        if fence is not None:
            continue
        yield number, re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        found, seen = set(), {}
        with open(path, encoding="utf-8") as f:
            text = f.read()
        fence = None
        for line in text.split("\n"):
            marker = re.match(r"(`{3,}|~{3,})", line.lstrip())
            if marker:
                fence = None if fence else marker.group(1)
                continue
            if fence:
                continue
            m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(1))
                n = seen.get(base, 0)
                seen[base] = n + 1
                found.add(base if n == 0 else f"{base}-{n}")
        cache[path] = found
    return cache[path]


def check_file(path):
    """The broken links of one file, as messages."""
    problems = []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for number, line in prose_lines(text):
        targets = [m.group(1) for m in INLINE.finditer(line)]
        ref = REFERENCE.match(line)
        if ref:
            targets.append(ref.group(1))
        for target in targets:
            if EXTERNAL.match(target):
                continue
            file_part, _, fragment = target.partition("#")
            resolved = (
                os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                if file_part
                else path
            )
            where = f"{os.path.relpath(path, ROOT)}:{number}"
            if not os.path.exists(resolved):
                problems.append(f"{where}: link to {target!r}: {os.path.relpath(resolved, ROOT)} does not exist")
                continue
            if fragment and resolved.endswith(".md"):
                if fragment not in anchors(resolved):
                    problems.append(
                        f"{where}: link to {target!r}: {os.path.relpath(resolved, ROOT)} has no heading "
                        f"with the anchor #{fragment} (it has: {', '.join(sorted(anchors(resolved))) or 'none'})"
                    )
    return problems


def self_test():
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "docs"))
        with open(os.path.join(d, "docs", "a.md"), "w") as f:
            f.write("# A\n\n## Behind a load balancer / in Kubernetes\n\n## `Server::tls`, TLS\n\n## A\n")
        with open(os.path.join(d, "README.md"), "w") as f:
            f.write(
                "[ok](docs/a.md) [ok](docs/a.md#behind-a-load-balancer--in-kubernetes)\n"
                "[ok](docs/a.md#servertls-tls) [ok](docs/a.md#a-1) [ok](#top) [ok](https://x.invalid/y)\n"
                "[ok `code`](docs/) [ok]: docs/a.md\n"
                "`[not a link](missing.md)`\n"
                "```\n[not a link](missing.md)\n```\n"
                "# Top\n"
                "[broken](docs/b.md)\n"
                "[broken anchor](docs/a.md#nope)\n"
                "[ref]: missing-ref.md\n"
            )
        problems = check_file(os.path.join(d, "README.md"))
        got = sorted(p.split(": link to ")[1].split(":")[0] for p in problems)
        want = sorted(["'docs/b.md'", "'docs/a.md#nope'", "'missing-ref.md'"])
        assert got == want, f"self-test: found {got}, expected {want}: {problems}"
    print("check-links self-test: ok")


def main(argv):
    if argv[1:] == ["--self-test"]:
        self_test()
        return 0
    files = [os.path.abspath(a) for a in argv[1:]] or list(markdown_files(ROOT))
    problems = [p for path in files for p in check_file(path)]
    for p in problems:
        print(p, file=sys.stderr)
    print(f"check-links: {len(files)} files, {len(problems)} broken links")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
