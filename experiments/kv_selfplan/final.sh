#!/bin/sh
# The reported figures: settings frozen from the screen on corpus windows 8..23 (screen_8_24.log);
# scored once on the corpus's last 16 windows and the last 10 windows of two other texts.
#   OMP_NUM_THREADS=1 sh experiments/kv_selfplan/final.sh > experiments/kv_selfplan/final.log
PY=${PY:-/work/main/.venv/bin/python}
STD=$($PY -c "import argparse, os; print(os.path.dirname(argparse.__file__))")
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD/src:$PWD
for v in "" "--vrot"; do
  $PY -m experiments.kv_selfplan.screen --last 16 --calib 0:8 --modes uniform offline qhook $v 2>&1 | grep '^{'
  $PY -m experiments.kv_selfplan.screen --last 10 --text $STD/argparse.py --calib 0:8 --modes uniform offline qhook $v 2>&1 | grep '^{'
  $PY -m experiments.kv_selfplan.screen --last 10 --text /usr/share/common-licenses/GPL-3 --calib 0:8 --modes uniform offline qhook $v 2>&1 | grep '^{'
done
# the full width menu (0..8), chosen on windows 8..23 by KL (0.01193 against 0.0121)
$PY -m experiments.kv_selfplan.screen --last 16 --modes qhook --vrot --menu 0,1,2,3,4,5,6,7,8 2>&1 | grep '^{'
$PY -m experiments.kv_selfplan.screen --last 10 --text $STD/argparse.py --modes qhook --vrot --menu 0,1,2,3,4,5,6,7,8 2>&1 | grep '^{'
$PY -m experiments.kv_selfplan.screen --last 10 --text /usr/share/common-licenses/GPL-3 --modes qhook --vrot --menu 0,1,2,3,4,5,6,7,8 2>&1 | grep '^{'
