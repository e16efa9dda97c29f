#!/usr/bin/env python3
"""Rewrite the configuration table of README.md from `triggers --help` (run after adding an option).

    cargo build && python3 scripts/readme-config.py
"""
import os
import re
import subprocess

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
binary = os.path.join(root, "target", "debug", "triggers")
text = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
rows = re.findall(r"^  (--\S+)\n      (\S+)  \[default: (.*)\]\n      (.*)$", text, re.M)
table = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
for flag, env, default, doc in rows:
    table.append(f"| `{flag}` | `{env}` | `{default}` | {doc} |")
path = os.path.join(root, "README.md")
readme = open(path).read()
start = readme.index("| flag | environment | default | meaning |")
end = readme.index("\n\n", start)
open(path, "w").write(readme[:start] + "\n".join(table) + readme[end:])
print(f"README.md: {len(rows)} options")
