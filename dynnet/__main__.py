from dynnet.cli import main

main()
