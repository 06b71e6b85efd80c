from dynnet.command import main

main()
