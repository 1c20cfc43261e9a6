#!/usr/bin/env bash
# The full budget on a GPU host, in slices: one with PyTorch but no package registry (the .gpu/ bundle), or a
# workstation with the project's .venv.
#
# Every stage runs through `medssl <stage>`, exactly the command dvc.yaml runs, with the packages the
# stages need beyond PyTorch's usual company (MLflow's client, pydantic, ...) installed from the wheels
# that `make gpu-bundle` put in .gpu/, beside DermaMNIST and MobileNetV2's ImageNet checkpoint.
# Independent stages run side by side on the GPU: the five pretrainings, then the seven grids.
# Before them, once: `medssl doctor` (the call fails, in one line, when a GPU is claimed but would go unused)
# and `python -m benchmarks` (args from $MEDSSL_BENCH_ARGS). Exit 0 adds every stage's seconds and the
# champion's test metrics to the benchmark's benchmarks/results/<device>_<date>_<commit>.{json,md}.
# On a GPU workstation that reaches PyPI no bundle is needed: `make gpu-run` (or $MEDSSL_PYTHON) runs it in the
# project's .venv, as does a call without .gpu/ where `make env weights` built .venv.
#
#   bash benchmarks/gpu_host.sh [key=value ...]     default overrides: budget=full
#
# Resumable: each call stops its stages with SIGINT after $MEDSSL_SLICE seconds (default 480; a stage then
# finishes its running epoch or cell, and is killed 60 s later at most), and they keep their last finished
# epoch or cell; the next call (same folder) continues. A stage that finished with the same params is not
# run again (outputs committed from other runs do not count). A slice must outlast the longest epoch or cell.
# Exit 0: all done; 3: out of time, call again; 4: out of time with nothing finished (no epoch, cell or stage),
# so calling again would not help; other: a stage failed (its log is in .medssl/gpu_host/logs/).
# Wall time per stage and call goes to .medssl/gpu_host/times.tsv; with $OUT set, results.tgz (metrics/,
# plots/, reports/, .medssl/gpu_host/, the benchmark's files) is written there.
set -uo pipefail
cd "$(dirname "$0")/.."
G=.gpu                # the bundle (read only)
R=.medssl/gpu_host    # this host's run: params, logs, times, finished stages
slice_end=$((SECONDS + ${MEDSSL_SLICE:-480}))
if [ -z "${MEDSSL_PYTHON:-}" ] && [ ! -d $G/whl ] && [ -x .venv/bin/python ]; then  # `make env weights` built .venv
  MEDSSL_PYTHON=$PWD/.venv/bin/python
fi
if [ -n "${MEDSSL_PYTHON:-}" ]; then  # `make gpu-run`, or no bundle: the project's .venv
  PY=$MEDSSL_PYTHON
  export PYTHONPATH="$PWD/src"
  echo "running in $PY (data as \`medssl fetch\` finds it: \$MEDSSL_DATA_PATH, ~/.medmnist or a download)" >&2
elif [ -d $G/whl ]; then  # an air-gapped host: PyTorch's company, the bundle's wheels, its data and checkpoint
  PY=python3
  SITE="${TMPDIR:-/tmp}/medssl-site-$(ls $G/whl | md5sum | cut -c1-12)"  # once per bundle
  if [ ! -f "$SITE/.complete" ]; then
    rm -rf "$SITE" && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $G/whl/*.whl \
      && touch "$SITE/.complete" || exit 2
  fi
  export PYTHONPATH="$SITE:$PWD/src"
  export MEDSSL_DATA_PATH="$PWD/$G/data/dermamnist.npz" TORCH_HOME="$PWD/$G/torch"
else
  echo "neither $G/whl nor .venv: run \`make gpu-bundle\` where PyPI is reachable and carry $G, or \`make env weights\` here" >&2
  exit 2
fi
export MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
mkdir -p $R/logs
P=$R/params.yaml

# params.yaml with the overrides, validated before any GPU time is spent; the MLflow store and experiment
# created here, once, so that stages starting side by side do not race to create them
# (stdout: the SSL inits, then all inits)
(($#)) || set -- budget=full
inits=$("$PY" - "$P" "$@" <<'EOF'
import sys, yaml
from medssl.config import load_params, set_dotted
from medssl.errors import ConfigError
from medssl.tracking import experiment_id
out, sets = sys.argv[1], sys.argv[2:]
raw = yaml.safe_load(open("params.yaml"))
for s in sets:
    key, _, value = s.partition("=")
    raw = set_dotted(raw, key, yaml.safe_load(value))
open(out, "w").write(yaml.safe_dump(raw, sort_keys=False))
try:
    p = load_params(out)
except ConfigError as e:
    sys.exit(f"{e} (from params.yaml with {' '.join(sets)})")
experiment_id(p)
print(f"budget {p.budget} at {p.image_size} px: {p.run_budget.pretrain_epochs} pretraining epochs, grid "
      f"{p.run_budget.grid.epochs} epochs x {len(p.grid.fractions)} fractions x {len(p.grid.seeds)} seeds, champion "
      f"{p.run_budget.finetune_epochs} epochs; inits {p.inits.all}", file=sys.stderr)
print(*p.inits.ssl)
print(*p.inits.all)
EOF
) || exit 2
{ read -r -a SSL; read -r -a ALL; } <<<"$inits"

MEDSSL=("$PY" -c 'from medssl.cli import main; main()')

# run NAME COMMAND...: COMMAND, stopped at the slice's end, unless it finished in an earlier call with the same
# params (a mark under $R/done/<md5 of P>/: outputs committed from other runs do not count)
run() {
  local name=$1 t0=$SECONDS rc left; shift
  [ -f "$DONE/$name" ] && return 0
  left=$((slice_end - SECONDS))
  ((left > 10)) || return 3
  timeout -s INT -k 60 $left "$@" >>$R/logs/$name.log 2>&1
  rc=$?
  printf '%s\t%s\t%d\t%d\n' "$(date -u +%FT%TZ)" "$name" $((SECONDS - t0)) $rc >>$R/times.tsv
  ((rc == 0)) && touch "$DONE/$name" && return 0
  ((rc == 124 || rc == 130)) && return 3
  echo "$name failed (exit $rc): $R/logs/$name.log" >&2
  [ "$name" = doctor ] && tail -n 1 $R/logs/$name.log >&2
  return $rc
}

# together COMMAND ITEMS...: `run COMMAND-ITEM COMMAND ITEM` for every item, side by side; a failed stage's exit
# code if any failed, else 3 if any ran out of time
together() {
  local cmd=$1 t0=$SECONDS rc=0 fail=0 r pids=(); shift
  local threads=$(( $(nproc) / $# > 0 ? $(nproc) / $# : 1 ))  # the CPU side of stages sharing the GPU
  for i in "$@"; do { export OMP_NUM_THREADS=$threads; run "$cmd-$i" "${MEDSSL[@]}" $cmd "$i" --params $P; } & pids+=($!); done
  for pid in "${pids[@]}"; do wait $pid; r=$?; ((r == 3)) && rc=3; ((r != 0 && r != 3)) && fail=$r; done
  ((fail)) && rc=$fail
  echo "$cmd x $#: $((SECONDS - t0)) s (exit $rc)" >&2
  return $rc
}

pack() {
  printf '%s\tslice\t%d\t-\n' "$(date -u +%FT%TZ)" $SECONDS >>$R/times.tsv
  [ -n "${OUT:-}" ] || return 0
  local stem; stem=$(cat $R/bench_stem 2>/dev/null)
  tar czf "$OUT/results.tgz" --ignore-failed-read $R metrics plots reports ${stem:+$stem.json $stem.md} 2>/dev/null
}
trap pack EXIT

# stop RC: exit RC, or 4 when the slice ended (3) and no stage wrote an epoch's or a cell's resume state
# (.medssl/resume/) or finished since this call began: the next call would end the same way
stop() {
  (($1 == 3)) && [ -z "$(find .medssl/resume $DONE -newer $R/call-start -print -quit 2>/dev/null)" ] && {
    echo "no stage finished an epoch, a grid cell or itself within MEDSSL_SLICE=${MEDSSL_SLICE:-480} s, so another call" \
         "would not either: give a slice more seconds than the longest epoch or cell takes ($R/logs/)" >&2
    exit 4
  }
  exit $1
}

DONE=$R/done/$(md5sum <$P | cut -c1-12)
mkdir -p $DONE
touch $R/call-start
run doctor "${MEDSSL[@]}" doctor || stop $?
# shellcheck disable=SC2086  # MEDSSL_BENCH_ARGS: words for the benchmark's own options
run benchmark "$PY" -m benchmarks --out benchmarks/results --stem-file $R/bench_stem ${MEDSSL_BENCH_ARGS:-} || stop $?
run fetch "${MEDSSL[@]}" fetch --params $P || stop $?
run prepare "${MEDSSL[@]}" prepare --params $P || stop $?
together pretrain "${SSL[@]}" || stop $?
together grid "${ALL[@]}" || stop $?
run finetune "${MEDSSL[@]}" finetune --params $P || stop $?
run evaluate "${MEDSSL[@]}" evaluate --params $P || stop $?
run export "${MEDSSL[@]}" export --params $P || stop $?
"$PY" - $SECONDS $R/bench_stem $P <<'EOF'
import csv, json, sys
import yaml
(init, test), = json.load(open("metrics/test.json")).items()
keys = ("accuracy", "balanced_accuracy", "auc_macro", "kappa")
print(f"champion {init}: test", ", ".join(f"{k} {test[k]:.4f}" for k in keys))
rows = list(csv.reader(open(".medssl/gpu_host/times.tsv"), delimiter="\t"))  # every call appends to it
total = {"slice": int(sys.argv[1])}  # this call so far; earlier calls from their rows
for r in rows:
    total[r[1]] = total.get(r[1], 0) + int(r[2])
print("seconds over all slices (slice: whole calls, setup included):", total)
stem = open(sys.argv[2]).read().strip()  # the benchmark's files: the pipeline's figures join them
params = yaml.safe_load(open(sys.argv[3]))
res = json.load(open(f"{stem}.json"))
size = json.load(open("metrics/data_card.json"))["image_size"]  # what prepare used: the budget's or data.image_size
res["pipeline"] = {"budget": params["budget"], "image_size": size, "champion": init,
                   "test": {k: test[k] for k in keys}, "seconds": total, "calls": sum(r[1] == "slice" for r in rows) + 1}
open(f"{stem}.json", "w").write(json.dumps(res, indent=2) + "\n")
md = [open(f"{stem}.md").read().split("\n## The pipeline")[0].rstrip("\n"), "",  # (again on a later exit 0)
      f"## The pipeline: budget {params['budget']} at {size} px, "
      f"{res['pipeline']['calls']} call(s) of benchmarks/gpu_host.sh", "",
      f"Champion **{init}** on the test split: " + ", ".join(f"{k} {test[k]:.4f}" for k in keys) + ".", "",
      "| stage | seconds over all calls |", "|---|---|"] + [f"| {k} | {v:,} |" for k, v in total.items()]
open(f"{stem}.md", "w").write("\n".join(md) + "\n")
print(f"wrote {stem}.json and {stem}.md")
EOF
echo done
