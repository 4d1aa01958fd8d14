#!/usr/bin/env bash
# Every measurement this project needs a GPU for, in one run that fits a short GPU lease:
# benchmarks/memory_speed.py at full size (SDXL 1024², SD1.5 512²; shared-base LoRA, reference
# LoRA, full; FLUX.1-dev 1024² shared-base LoRA) beside the --dry-run estimate, then `dmd distill` end to end on CUDA in bf16 (tiny
# teacher: prompt cache, grids, checkpoint, resume, sample, export).
#
#   bash benchmarks/gpu_check.sh --fetch-wheels   # here, with a package registry: the packages a
#                                                 # bare GPU image with torch lacks, into .whl/
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]    # on the GPU machine (default: $OUT, else
#                                                 # benchmarks/results/gpu)
#
# Each step has its own time limit (about 1.5x what it took on an H200, 2026-11-30: 104, 88, 54 s
# and ~120 s for the CLI), so one that hangs does not take the others with it; a step's failure is
# reported and the rest still run. About 7 minutes on an H200 (the FLUX step not yet timed); the optional steps at the end run only
# while the budget lasts, and every table is written as soon as its step ends. The tables go to RESULTS_DIR/*.md, the
# whole log to RESULTS_DIR/log.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Versions of the CPU build machine's environment; diffusers needs huggingface-hub ≥ 1.32.
    # peft travels too: the image has one of a version nobody has read, and the run should measure
    # memory, not find out whether our peft floor holds (the log prints the image's versions).
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        diffusers==0.42.1 tomli_w==1.2.0 clean-fid==0.1.35 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
        peft==0.21.2
    exit
fi

results=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$results"
exec > >(tee "$results/log.txt") 2>&1
python3 -c "from importlib.metadata import version, PackageNotFoundError
def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return 'absent'
print('the image has:', *(f'{n} {v(n)},' for n in ['torch', 'transformers', 'accelerate', 'peft', 'huggingface_hub', 'typer', 'rich', 'safetensors', 'numpy', 'diffusers']))"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 DIFFUSERS_VERBOSITY=error
python3 -c "import torch, diffusers, accelerate, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
'accelerate', accelerate.__version__, 'peft', peft.__version__, '|', torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

failed=0
budget=${GPU_CHECK_SECONDS:-560}  # the optional steps at the end run only if their limit fits in what is left of this
step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}
optional() {  # optional NAME SECONDS COMMAND...: a step that runs only if its limit fits in what is left of the budget
    if [ $((SECONDS + $2)) -le "$budget" ]; then
        step "$@"
    else
        echo "== $1: skipped, $((budget - SECONDS))s left of ${budget}s"
    fi
}

bench="python3 benchmarks/memory_speed.py --iterations 3"
# The 24 GB goal first: SDXL 4-step shared-base LoRA at 1024².
step sdxl-lora 160 bash -c "$bench --arch sdxl --resolution 1024 --layouts lora-shared lora-reference | tee $results/sdxl-lora.md"
step sd15 120 bash -c "$bench --arch sd15 --resolution 512 --layouts lora-shared lora-reference full | tee $results/sd15.md"
# FLUX.1-dev size (12B transformer, random weights; shared-base LoRA: full fine-tuning needs FSDP), 1024²,
# beside --dry-run's estimate. Not yet run on a GPU: the limit is a guess (building 12B fp32 weights
# on the host, then three iterations of about 2-4 s).
step flux-lora 180 bash -c "$bench --arch flux-dev --resolution 1024 --layouts lora-shared | tee $results/flux-lora.md"

# The CLI on CUDA in bf16, as a user runs it (tiny random teacher: checks the code path, not quality).
# Seven Python starts; each took 10-15 s on the H200 machine, so 100 s was too short there.
run=/tmp/dmd-gpu-check
rm -rf $run && mkdir -p $run
printf 'a red circle\na blue square\na green triangle\n' > $run/prompts.txt
dmd() { python3 -m dmdcli "$@"; }
export -f dmd
step cli-distill 200 bash -c "python3 -m dmdcli.models.tiny $run/teacher > /dev/null &&
    dmd distill --recipe tiny --teacher $run/teacher --prompts $run/prompts.txt --iterations 20 --checkpoint-every 10 \
        --steps 4 --lora-rank 4 --out $run/run --json | tee $results/cli.json &&
    dmd distill --out $run/run --resume --iterations 30 --json | tee -a $results/cli.json &&
    dmd sample --model $run/run --prompt 'a red circle' --out $run/images --json &&
    dmd export --model $run/run --format diffusers --out $run/export &&
    dmd sample --model $run/export --prompt 'a red circle' --out $run/images-export --json &&
    dmd distill --recipe tiny --teacher $run/teacher --prompts $run/prompts.txt --dry-run --json > $results/cli-dry-run.json"
# A Qwen-Image teacher on CUDA in bf16 (tiny random pipeline: the masked text, Wan's VAE, the packing).
step cli-qwen-image 120 bash -c "python3 -m dmdcli.models.tiny $run/qwen-teacher --layout qwen-image > /dev/null &&
    dmd distill --recipe tiny --teacher $run/qwen-teacher --prompts $run/prompts.txt --iterations 10 --steps 4 \
        --guidance-scale 4 --lora-rank 4 --out $run/qwen-run --json | tee $results/cli-qwen-image.json &&
    dmd sample --model $run/qwen-run --prompt 'a red circle' --out $run/qwen-images --json"

# Optional, when time is left. Gradient accumulation on CUDA: the micro-batches wait on the host and go
# to the GPU one at a time (a path the CPU tests cannot tell from the device's), with the GAN's real images.
optional cli-accumulation 75 bash -c "python3 -m dmdcli.models.tiny $run/accumulation-teacher > /dev/null &&
    mkdir -p $run/images-data && python3 -c \"from PIL import Image; [(Image.new('RGB', (32, 32), c).save('$run/images-data/%d.png' % i), open('$run/images-data/%d.txt' % i, 'w').write('a square')) for i, c in enumerate(['red', 'blue', 'green', 'white'])]\" &&
    dmd distill --recipe tiny --teacher $run/accumulation-teacher --prompts $run/prompts.txt --data $run/images-data \
        --iterations 6 --steps 4 --lora-rank 4 --batch-size 1 --gradient-accumulation-steps 4 --out $run/accumulation-run --json \
        | tee $results/cli-accumulation.json"
# SDXL full fine-tuning (measured 2026-11-30: benchmarks/results/gpu-h200).
optional sdxl-full 100 bash -c "$bench --arch sdxl --resolution 1024 --layouts full | tee $results/sdxl-full.md"
# Then where a LoRA iteration's time goes: on the H200 (2026-11-30)
# rank-64 LoRA networks took ~1 s more an iteration each than full ones at SDXL 1024², though their
# extra FLOPs are a few percent; many small kernels and peft's per-layer Python would show as host
# time above GPU time in these tables.
optional sdxl-profile 150 bash -c "$bench --arch sdxl --resolution 1024 --layouts full lora-shared --iterations 2 --profile 25 2> $results/sdxl-profile.txt"
# Then issue 25's lever on CUDA: the same SD1.5 rows with torch's default AdamW (foreach), the fused one's being above.
optional sd15-loop-optimizer 120 bash -c "$bench --arch sd15 --resolution 512 --layouts lora-shared full --loop-optimizer | tee $results/sd15-loop-optimizer.md"
# Then what gradient checkpointing costs in speed and saves in memory.
optional sdxl-lora-no-checkpointing 120 bash -c "$bench --arch sdxl --resolution 1024 --layouts lora-shared --no-checkpointing | tee $results/sdxl-lora-no-checkpointing.md"
# Then FLUX.2 [klein] 4B (random weights from its public config), shared-base LoRA at 1024², beside
# --dry-run's estimate (13.9 GiB); and dmd distill on the tiny FLUX.2 pipeline in CUDA's bf16
# (its Qwen3 encoding, batch-norm latents and position ids; not yet run on a GPU, the limits are guesses).
optional flux2-klein-lora 150 bash -c "$bench --arch flux2-klein-4b --resolution 1024 --layouts lora-shared | tee $results/flux2-klein-lora.md"
optional cli-flux2 90 bash -c "python3 -m dmdcli.models.tiny $run/flux2-teacher --layout flux2 > /dev/null &&
    dmd distill --recipe tiny --teacher $run/flux2-teacher --prompts $run/prompts.txt --iterations 10 --steps 4 \
        --guidance-scale 4 --lora-rank 4 --out $run/flux2-run --json | tee $results/cli-flux2.json &&
    dmd sample --model $run/flux2-run --prompt 'a red circle' --out $run/flux2-images --json"
# The same on the tiny FLUX.2 [dev] pipeline: its Mistral encoder read and run in bf16 on CUDA, the
# guidance embedding. (The 32B transformer itself cannot be built here: memory_speed.py builds it in
# fp32 on the host, 129 GB.)
optional cli-flux2-dev 90 bash -c "python3 -m dmdcli.models.tiny $run/flux2-dev-teacher --layout flux2-dev > /dev/null &&
    dmd distill --recipe tiny --teacher $run/flux2-dev-teacher --prompts $run/prompts.txt --iterations 10 --steps 4 \
        --guidance-scale 1 --embedded-guidance 4 --lora-rank 4 --out $run/flux2-dev-run --json | tee $results/cli-flux2-dev.json &&
    dmd sample --model $run/flux2-dev-run --prompt 'a red circle' --out $run/flux2-dev-images --json"
# Then Chroma1-HD (8.9B, random weights from its public config), shared-base LoRA at 1024² (--dry-run:
# 27.0 GiB); its CFG batch runs as two forwards (the prompts' and the negative prompt's lengths).
optional chroma-lora 150 bash -c "$bench --arch chroma --resolution 1024 --layouts lora-shared | tee $results/chroma-lora.md"
# Then Z-Image (6.2B, random weights from its public config), shared-base LoRA at 1024² (--dry-run: 22.2 GiB).
optional z-image-lora 150 bash -c "$bench --arch z-image --resolution 1024 --layouts lora-shared | tee $results/z-image-lora.md"
# Then Qwen-Image's size (20B transformer, random weights built in fp32 on the host, ~82 GB of its
# 128; not yet run on a GPU, the limit is a guess), shared-base LoRA at 1024², beside --dry-run's estimate.
optional qwen-image-lora 300 bash -c "$bench --arch qwen-image --resolution 1024 --layouts lora-shared | tee $results/qwen-image-lora.md"
# Then host memory of reading a network onto the GPU: fp32 then cast, against bf16 straight onto it
# (a shared LoRA base, dmd sample); measured on a CPU only (benchmarks/results/host-memory).
optional host-memory 90 bash -c "python3 benchmarks/host_memory.py --arch sd15 --device cuda | tee $results/host-memory.md"
echo "== done: $failed step(s) failed after ${SECONDS}s"
exit $failed
