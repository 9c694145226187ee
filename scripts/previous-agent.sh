#!/usr/bin/env bash
# Builds the agent of the last release that spoke agent protocol 1, from
# this repository's history, and prints its path; tests boot a VM with it
# to check that the daemon still speaks to VMs started before an upgrade.
# Built once into target/previous-agent/. Prints nothing (and says why on
# stderr) when the history lacks the commit, e.g. in a shallow clone.
set -euo pipefail
cd "$(dirname "$0")/.."
# The last commit whose agent speaks protocol 1.
commit=4e67023f5567421220badb35c60acfcc14d39ab8
out="$PWD/target/previous-agent"
agent="$out/banger-agent-$commit"
if [[ -x $agent ]]; then
    echo "$agent"
    exit 0
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "previous-agent.sh: commit $commit is not in this clone's history" >&2
    exit 0
fi
src="$out/src-$commit"
rm -rf "$src"
mkdir -p "$src"
git archive "$commit" | tar -x -C "$src"
# Built in its own tree (its target/), so the current build's cache stays.
built=$("$src/scripts/build-agent.sh")
cp "$built" "$agent.tmp"
mv "$agent.tmp" "$agent"
rm -rf "$src"
echo "$agent"
