from fcconv.cli import run

run()
