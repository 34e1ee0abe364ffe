import sys

from modeldoctor.cli import main

sys.exit(main())
