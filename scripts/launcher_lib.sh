# Sourced by the paper launchers (scripts/train_*.sh, scripts/sample_*.sh): their --help, the run names and resuming.
# A launcher sources it first and calls `launcher_help "$@"`; the arguments it is given go, unchanged, after its own
# flags on the train.py / generate.py command line (the later flag wins in both).

# --help / -h: the launcher's header comment, its variables with their defaults, and what extra arguments do; exit 0.
launcher_help() {
    local arg script=${BASH_SOURCE[1]}
    for arg in "$@"; do
        [ "$arg" = --help ] || [ "$arg" = -h ] || continue
        echo "usage: [VARIABLE=value ...] bash $script [$LAUNCHER_TOOL flags ...]"
        echo
        sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$script"
        echo
        echo "Variables (environment):"
        grep -oE '^[A-Z_]+=\$\{[A-Z_]+:[-?][^}]*\}' "$script" | sed -E \
            -e 's/^([A-Z_]+)=\$\{[A-Z_]+:-"?([^}"]*)"?\}$/  \1 (default: \2)/' \
            -e 's/^([A-Z_]+)=\$\{[A-Z_]+:\?([^}]*)\}$/  \1 (required: \2)/'
        echo
        echo "Extra arguments are passed to $LAUNCHER_TOOL after the launcher's own flags (a flag given again wins)."
        if [ "$LAUNCHER_TOOL" = train.py ]; then
            echo "A run continues (--resume latest) when <output-dir>/<exp-name>/checkpoints/ already holds a checkpoint:"
            echo "re-run the same command after an interruption."
        fi
        exit 0
    done
}

# The value of flag $1 (or its REPA spelling $2) in the remaining arguments, if given; empty otherwise.
launcher_flag() {
    local long=$1 alt=$2 value=""
    shift 2
    while [ $# -gt 0 ]; do
        case "$1" in
            "$long" | "$alt") value=${2:-}; shift ;;
            "$long="* | "$alt="*) value=${1#*=} ;;
        esac
        shift
    done
    printf '%s' "$value"
}

# RUN_ARGS for one train.py run named $1 (train.py's own default name: the README's spelling), or $2, the name this
# launcher used before, when a run of that name exists: --output-dir, --exp-name and, when the run directory holds a
# checkpoint, --resume latest. An --exp-name, --output-dir or --resume among the extra arguments ($3 ...) wins.
run_args() {
    local name=$1 old=$2
    shift 2
    local out given
    out=$(launcher_flag --output-dir --output_dir "$@")
    out=${out:-runs}
    given=$(launcher_flag --exp-name --exp_name "$@")
    if [ -n "$given" ]; then
        name=$given
    elif [ -n "$old" ] && [ "$old" != "$name" ] && [ -d "$out/$old" ] && [ ! -d "$out/$name" ]; then
        echo "$(basename "${BASH_SOURCE[1]}"): $out/$old exists (this launcher's earlier name for $out/$name):" \
            "continuing it under its own name" >&2
        name=$old
    fi
    RUN_ARGS=(--output-dir "$out" --exp-name "$name")
    if [ -n "$(launcher_flag --resume --resume-step "$@")" ]; then
        return 0
    fi
    if compgen -G "$out/$name/checkpoints/[0-9][0-9][0-9][0-9][0-9][0-9][0-9].pt" > /dev/null; then
        echo "$(basename "${BASH_SOURCE[1]}"): $out/$name has checkpoints: resuming from the latest" >&2
        RUN_ARGS+=(--resume latest)
    fi
}

# train.py's default run name for model $1 and method set $2 (train.py's --align; none: vanilla): SiT-XL-2-vae-repa,
# the methods joined with + in train.py's order (alignment.METHOD_NAMES), whatever order $2 lists them in.
default_name() {
    local method joined=""
    for method in vae-repa repa sra; do
        [[ ",${2// /}," == *",$method,"* ]] && joined+=${joined:++}$method
    done
    printf '%s-%s' "${1//\//-}" "${joined:-vanilla}"
}

# GPUS, the processes of one launch: a whole number from 1 up, else one line and exit 2 (accelerate and torchrun
# answered 0 or a word with a traceback). LAUNCH_PROCS: accelerate launch's flags for it, --multi_gpu from 2
# processes on (accelerate refuses --multi_gpu for one).
check_gpus() {
    if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
        echo "$(basename "${BASH_SOURCE[1]}"): GPUS=$GPUS: expected the number of GPUs (processes) to use, 1 or more" >&2
        exit 2
    fi
    LAUNCH_PROCS=(--num_processes "$GPUS")
    if [ "$GPUS" -gt 1 ]; then
        LAUNCH_PROCS=(--multi_gpu "${LAUNCH_PROCS[@]}")
    fi
}
