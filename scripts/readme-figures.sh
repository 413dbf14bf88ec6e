#!/usr/bin/env bash
# Regenerates the figures in README.md and docs/ from the last runs' JSON, never by hand:
#
#   README.md           <!-- bench:begin/end -->  whizbang-bench report --markdown --headline
#                       <!-- chaos:begin/end -->  whizbang-chaos report --headline
#   docs/benchmarks.md  <!-- bench:begin/end -->  whizbang-bench report --markdown (every figure)
#   docs/chaos.md       <!-- chaos:begin/end -->  whizbang-chaos report --markdown
#
#   scripts/readme-figures.sh
#
# Inputs: target/bench/results.json and target/chaos/results.json (with the scenarios' files
# beside it). Run `cargo run --release --bin whizbang-bench -- all` and `scripts/chaos.sh`
# first; this script measures nothing. It fails, leaving every file untouched, when a results
# file is missing or records errors, or when a marker pair is missing or doubled.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
target_dir="${CARGO_TARGET_DIR:-target}"

die() {
    echo "readme-figures: $*" >&2
    exit 1
}

for json in "$target_dir/bench/results.json" "$target_dir/chaos/results.json"; do
    [ -f "$json" ] || die "$json is missing: run \`cargo run --release --bin whizbang-bench -- all\` and scripts/chaos.sh first"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo run --quiet --release --bin whizbang-bench -- report --markdown --headline >"$work/headline.md" \
    || die "whizbang-bench report --markdown --headline failed"
cargo run --quiet --release --bin whizbang-bench -- report --markdown >"$work/bench.md" \
    || die "whizbang-bench report --markdown failed"
cargo run --quiet --release --bin whizbang-chaos -- report --markdown >"$work/chaos.md" \
    || die "whizbang-chaos report --markdown failed"
cargo run --quiet --release --bin whizbang-chaos -- report --headline >"$work/chaos-headline.md" \
    || die "whizbang-chaos report --headline failed"

# Replaces what lies between each named marker pair (the markers stay) with its table; writes
# FILE.new beside each, and only when every file succeeded are they moved into place.
python3 - "$work" <<'PY' || die "no file was changed"
import sys
work = sys.argv[1]
plan = {
    "README.md": {"bench": f"{work}/headline.md", "chaos": f"{work}/chaos-headline.md"},
    "docs/benchmarks.md": {"bench": f"{work}/bench.md"},
    "docs/chaos.md": {"chaos": f"{work}/chaos.md"},
}
for doc, tables in plan.items():
    text = open(doc, encoding="utf-8").read()
    for name, path in tables.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if text.count(begin) != 1 or text.count(end) != 1:
            sys.exit(f"readme-figures: {doc} needs exactly one {begin} and one {end}")
        if text.index(end) < text.index(begin):
            sys.exit(f"readme-figures: {end} comes before {begin} in {doc}")
        head, rest = text.split(begin)
        _, tail = rest.split(end)
        table = open(path, encoding="utf-8").read().strip()
        text = f"{head}{begin}\n{table}\n{end}{tail}"
    open(f"{doc}.new", "w", encoding="utf-8").write(text)
PY
for doc in README.md docs/benchmarks.md docs/chaos.md; do
    mv "$doc.new" "$doc"
done
echo "readme-figures: README.md, docs/benchmarks.md and docs/chaos.md updated from $target_dir/bench/results.json and $target_dir/chaos/results.json"
