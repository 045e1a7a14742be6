from nsd.cli import main

main()
