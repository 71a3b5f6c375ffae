# Sourced by every script in scripts/: `--help` prints the calling script's header comment
# (its documentation) and exits 0; fewer than MIN_ARGS arguments print it and exit 2.
#
# Usage (in a script): source "<path to>/scripts/lib/usage.bash" MIN_ARGS "$@"
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
if [[ "${2:-}" == "-h" || "${2:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $(($# - 1)) -lt $1 ]]; then usage >&2; exit 2; fi
