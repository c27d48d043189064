from engine.doors.cli import main

main()
