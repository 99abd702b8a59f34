#!/usr/bin/env bash
# The report's tools: pdflatex with booktabs (the LaTeX tables, `nox -s paper`) and
# Chromium, headless (the gallery test loads gallery.html in a real browser). Debian packages;
# skipped when already present.
set -euo pipefail
need=()
command -v pdflatex >/dev/null && kpsewhich booktabs.sty >/dev/null 2>&1 \
    || need+=(texlive-latex-base texlive-latex-recommended texlive-fonts-recommended)
command -v chromium >/dev/null || need+=(chromium)
[ ${#need[@]} -eq 0 ] && { echo "report tools present: pdflatex, booktabs, chromium"; exit 0; }
SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
$SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
