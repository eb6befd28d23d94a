import sys

from stream_cl.cli import main

sys.exit(main())
