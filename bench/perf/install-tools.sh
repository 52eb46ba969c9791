#!/usr/bin/env bash
# perf_analyzer 2.60.0 and genai-perf into build/tools/ (git-ignored), outside the project venv.
#   perf_analyzer: the PyPI wheel is manylinux_2_38 (needs GLIBC 2.38, GLIBCXX 3.4.32); on an older glibc it runs
#     through Debian trixie's loader and libc/libstdc++ (toolchain.md §4), fetched with apt-get download.
#   genai-perf: its own venv (about 70 dependencies: pandas, pyarrow, scipy, plotly ...), pin from pyproject's
#     `perf` extra; it calls `perf_analyzer` from PATH, so build/tools/bin goes first on PATH.
#   tokenizer/: the embedded tiny model's tokenizer.json as a transformers tokenizer directory (genai-perf
#     counts tokens with AutoTokenizer and must not download one).
# Usage: bench/perf/install-tools.sh PYTHON   (make perf-tools)
set -euo pipefail
PY=${1:-python3}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
T=$ROOT/build/tools
mkdir -p "$T/bin" "$T/dl"
cd "$T"

if [ ! -x pa/perf_analyzer/bin/perf_analyzer ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 perf-analyzer==2.60.0 -d dl
  rm -rf pa && "$PY" -m zipfile -e dl/perf_analyzer-2.60.0-*.whl pa && chmod +x pa/perf_analyzer/bin/perf_analyzer
fi
L=$T/root/usr/lib/x86_64-linux-gnu
if ldd --version 2>/dev/null | head -1 | grep -qE ' 2\.(3[89]|[4-9][0-9])$'; then
  printf '#!/bin/sh\nexec %s "$@"\n' "$T/pa/perf_analyzer/bin/perf_analyzer" > bin/perf_analyzer
else
  if [ ! -e "$L/ld-linux-x86-64.so.2" ]; then
    O="-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts=$T/apt/parts -o Dir::State::Lists=$T/apt/lists"
    O="$O -o Dir::Cache=$T/apt/cache -o Debug::NoLocking=1"
    mkdir -p apt/parts apt/lists/partial apt/cache/archives/partial debs
    printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > apt/parts/trixie.sources
    apt-get $O update -qq
    (cd debs && apt-get $O download -qq libc6 libstdc++6 libgcc-s1)
    for d in debs/*.deb; do dpkg -x "$d" root; done
  fi
  printf '#!/bin/sh\nexec %s --library-path %s:/lib/x86_64-linux-gnu %s "$@"\n' \
    "$L/ld-linux-x86-64.so.2" "$L" "$T/pa/perf_analyzer/bin/perf_analyzer" > bin/perf_analyzer
fi
chmod +x bin/perf_analyzer
bin/perf_analyzer --version

if [ ! -x venv/bin/genai-perf ]; then
  PIN=$("$PY" -c "import tomllib; print(*tomllib.load(open('$ROOT/pyproject.toml', 'rb'))['project']['optional-dependencies']['perf'])")
  "$PY" -m venv venv && venv/bin/pip install -q $PIN
fi
printf '#!/bin/sh\nPATH=%s:$PATH exec %s "$@"\n' "$T/bin" "$T/venv/bin/genai-perf" > bin/genai-perf
chmod +x bin/genai-perf

venv/bin/python - "$ROOT/src/dgemma/assets/tiny-sort/tokenizer.json" "$T/tokenizer" <<'PYEOF'
import sys
from transformers import PreTrainedTokenizerFast
PreTrainedTokenizerFast(tokenizer_file=sys.argv[1], bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                        unk_token="<unk>").save_pretrained(sys.argv[2])
PYEOF
echo "perf tools ready: $T/bin/perf_analyzer, $T/bin/genai-perf, tokenizer $T/tokenizer"
