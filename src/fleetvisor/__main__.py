from fleetvisor.cli.main import main

main()
