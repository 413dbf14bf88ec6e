#!/usr/bin/env bash
# Regenerates the figures in README.md from the last runs' JSON, never by hand:
#
#   <!-- bench:begin --> ... <!-- bench:end -->   whizbang-bench report --markdown
#                                                 (target/bench/results.json)
#   <!-- chaos:begin --> ... <!-- chaos:end -->   whizbang-chaos report --markdown
#                                                 (target/chaos/results.json and the scenarios)
#
#   scripts/readme-figures.sh [README]       (default README.md)
#
# Run `cargo run --release --bin whizbang-bench -- all` and `scripts/chaos.sh` first; this script
# measures nothing. It fails, leaving the file untouched, when a results file is missing or
# records errors, or when a marker pair is missing or doubled.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
readme=${1:-README.md}
target_dir="${CARGO_TARGET_DIR:-target}"

die() {
    echo "readme-figures: $*" >&2
    exit 1
}

[ -f "$readme" ] || die "$readme not found"
for json in "$target_dir/bench/results.json" "$target_dir/chaos/results.json"; do
    [ -f "$json" ] || die "$json is missing: run \`cargo run --release --bin whizbang-bench -- all\` and scripts/chaos.sh first"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo run --quiet --release --bin whizbang-bench -- report --markdown >"$work/bench.md" \
    || die "whizbang-bench report --markdown failed"
cargo run --quiet --release --bin whizbang-chaos -- report --markdown >"$work/chaos.md" \
    || die "whizbang-chaos report --markdown failed"

# Replaces what lies between each marker pair (the markers stay) with its table.
python3 - "$readme" "$work/bench.md" "$work/chaos.md" "$work/readme.new" <<'PY'
import sys
readme, bench, chaos, out = sys.argv[1:]
text = open(readme, encoding="utf-8").read()
for name, path in (("bench", bench), ("chaos", chaos)):
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        sys.exit(f"readme-figures: {readme} needs exactly one {begin} and one {end}")
    if text.index(end) < text.index(begin):
        sys.exit(f"readme-figures: {end} comes before {begin} in {readme}")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    table = open(path, encoding="utf-8").read().strip()
    text = f"{head}{begin}\n{table}\n{end}{tail}"
open(out, "w", encoding="utf-8").write(text)
PY
mv "$work/readme.new" "$readme"
echo "readme-figures: $readme updated from $target_dir/bench/results.json and $target_dir/chaos/results.json"
