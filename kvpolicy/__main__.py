from kvpolicy.cli import main
import sys
sys.exit(main())
