#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: system packages (SLURM, MPI, a
# headless browser, a Java runtime) and the Python packages (torch CPU wheels, mgpt4 with its dev extras).
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_PACKAGES=(
  # multi-rank and SLURM tests
  openmpi-bin libopenmpi-dev slurmctld slurmd slurm-client munge libpmix2
  # the web demo's browser test
  chromium chromium-driver
  # caption metrics: pycocoevalcap's METEOR and PTB tokenizer are Java programs
  default-jre-headless
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  # Without systemd, the SLURM packages' postinst tries to start daemons and fails; policy-rc.d
  # answering 101 makes invoke-rc.d skip that (the tests start the daemons themselves).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
    $SUDO chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ $made_policy = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi

python3 -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python3 -m pip install -q -e ".[dev]"
