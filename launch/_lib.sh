# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run).

# The command on one line, each word quoted for a POSIX shell only when it needs it (single quotes,
# easier to read than printf %q's backslashes): what --dry-run prints, and what would run.
print_command() {
    local first=1 word squote="'" escaped="'\\''"
    for word in "$@"; do
        if [[ $first -eq 1 ]]; then first=0; else printf ' '; fi
        if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            printf '%s' "$word"
        else
            printf "'%s'" "${word//$squote/$escaped}"
        fi
    done
    printf '\n'
}

# PYTHON if set, else the checkout's .venv (what `make` installs), else python3.
find_python() {
    local root="$1"
    if [[ -n "${PYTHON:-}" ]]; then
        printf '%s\n' "$PYTHON"
    elif [[ -x "$root/.venv/bin/python" ]]; then
        printf '%s\n' "$root/.venv/bin/python"
    else
        printf 'python3\n'
    fi
}

# usage CODE: the calling script's header comment (its lines HELP_LINES, e.g. '2,10') as help, then exit CODE.
usage() {
    sed -n "${HELP_LINES}p" "$0" | sed 's/^# \{0,1\}//'
    exit "$1"
}

# require COUNT NAME...: stops with the usage unless every option variable NAME is set (reported as
# --NAME, underscores as dashes) and retina_jax.main has COUNT > 0 arguments.
require() {
    local script count="$1" name
    script="$(basename "$0")"
    shift
    for name in "$@"; do
        if [[ -z "${!name}" ]]; then
            echo "$script: --${name//_/-} is required" >&2
            usage 2
        fi
    done
    if [[ $count -eq 0 ]]; then
        echo "$script: give retina_jax.main's arguments after --" >&2
        usage 2
    fi
}
