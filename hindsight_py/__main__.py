import sys

from hindsight_py.cli import main_py

sys.exit(main_py())
