#!/usr/bin/env bash
# The Debian packages the tests use, installed when a tool is missing: the one
# list that `make test` and CI share. As root it runs apt-get; otherwise it
# prints the exact command to run and fails.
#
#   scripts/system-deps.sh          install what is missing (root), or say how
#   scripts/system-deps.sh --list   print "tool package" pairs (the test of this file reads it)
set -euo pipefail

# tool the tests (or scripts/slurm-up.sh) look for -> the Debian package that has it
TOOLS=(
    "setpriv util-linux"              # agents tie vLLM's life to theirs
    "munged munge"                    # the test SLURM (scripts/slurm-up.sh)
    "slurmctld slurmctld"
    "slurmd slurmd"
    "sbatch slurm-client"
    "squeue slurm-client"
    "scancel slurm-client"
    "sshd openssh-server"             # the slurm launcher's SSH target
    "ssh-keygen openssh-client"
    "slapd slapd"                     # the portal's LDAP tests
    "ldapadd ldap-utils"
    "chromium chromium"               # the portal's browser tests
    "fc-list fontconfig"              # fonts-dejavu-core below: text in screenshots
)
EXTRA_PACKAGES=(fonts-dejavu-core)

if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${TOOLS[@]}" | sed 's/ *#.*//'
    exit 0
fi

packages=()
for entry in "${TOOLS[@]}"; do
    read -r tool package <<<"$entry"
    PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null || packages+=("$package")
done
if [[ ${#packages[@]} -eq 0 ]]; then
    exit 0
fi
mapfile -t packages < <(printf '%s\n' "${packages[@]}" "${EXTRA_PACKAGES[@]}" | sort -u)
command="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ${packages[*]}"
if [[ $(id -u) -ne 0 ]]; then
    echo "system-deps: missing Debian packages; as root, run:" >&2
    echo "  $command" >&2
    exit 1
fi
echo "system-deps: installing ${packages[*]}" >&2
bash -c "$command"
