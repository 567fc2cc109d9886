#!/usr/bin/env python3
"""Checks that no dependency in Cargo.lock needs a newer Rust than our `rust-version`.

Only the one toolchain of the machine can be installed here, so the MSRV cannot be built; this
checks the part that most often breaks it (a dependency update raising its own rust-version).
Reads `cargo metadata --locked` on stdin.
"""
import json
import sys


def version(text):
    parts = [int(p) for p in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


meta = json.load(sys.stdin)
ours = next(p for p in meta["packages"] if p["name"] == "handover")["rust_version"]
newer = [
    f'{p["name"]} {p["version"]} needs Rust {p["rust_version"]}'
    for p in meta["packages"]
    if p.get("rust_version") and version(p["rust_version"]) > version(ours)
]
if newer:
    print(f"rust-version = {ours}, but:", *newer, sep="\n  ")
    sys.exit(1)
print(f"rust-version = {ours}: every dependency in Cargo.lock supports it")
