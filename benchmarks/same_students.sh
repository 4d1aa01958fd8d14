#!/usr/bin/env bash
# Behaviour check for refactors: the same commands make the same students, tensor for tensor.
#   bash benchmarks/same_students.sh make DIR     # run the commands, keep their students in DIR
#   bash benchmarks/same_students.sh compare A B  # every student tensor in A equals B's, bit for bit
# Run `make` at the commit before a refactor and after it, then `compare`. Tiny teacher, CPU,
# about 3 minutes: full, LoRA and shared-base LoRA; 1 and 4 steps; a stopped and resumed run.
set -euo pipefail
mode=$1
if [[ $mode == make ]]; then
  dir=$(realpath -m "$2"); mkdir -p "$dir"
  export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
  teacher="$dir/teacher"
  [[ -d $teacher ]] || python -m dmdcli.models.tiny "$teacher" >/dev/null
  printf 'a red cube\na blue sphere\na green cone\na small cat\n' > "$dir/prompts.txt"
  common=(--teacher "$teacher" --recipe tiny --prompts "$dir/prompts.txt" --iterations 6 --log-every 2
          --sample-every 0 --teacher-grid-steps 0 --checkpoint-every 3 --quiet --overwrite)
  run() { local name=$1; shift; dmd distill "${common[@]}" --out "$dir/$name" "$@"; }
  run full-1 --steps 1
  run full-4 --steps 4
  run lora-1 --steps 1 --lora-rank 4
  run shared-4 --steps 4 --lora-rank 4 --shared-base
  run reference-4 --steps 4 --lora-rank 4 --no-shared-base
  # Stopped after 3 iterations, then resumed to 6: must equal full-4.
  run resumed-4 --steps 4 --iterations 3
  dmd distill --resume --out "$dir/resumed-4" --iterations 6 --quiet
  echo "students in $dir"
elif [[ $mode == compare ]]; then
  python - "$2" "$3" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
a, b = Path(sys.argv[1]), Path(sys.argv[2])
files = sorted(p.relative_to(a) for p in a.glob("*/student*.safetensors"))
assert files, f"no students under {a}"
bad = 0
for rel in files:
    x, y = load_file(a / rel), load_file(b / rel)
    same = x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and x[k].equal(y[k]) for k in x)
    bad += not same
    print(("same " if same else "DIFFERENT ") + str(rel))
r4 = sorted((a / "resumed-4").glob("student*.safetensors"))
for p in r4:
    f = a / "full-4" / p.relative_to(a / "resumed-4")
    same = all(load_file(p)[k].equal(v) for k, v in load_file(f).items())
    bad += not same
    print(("same " if same else "DIFFERENT ") + f"resumed-4 vs full-4: {p.name}")
sys.exit(1 if bad else 0)
PY
fi
