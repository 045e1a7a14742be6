from nsd.client.cli import main

main()
