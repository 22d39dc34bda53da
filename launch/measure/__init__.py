"""One-off measurements (trainer throughput, Mano's axis-switch cost, init memory, prepare speed):
they import the product; nothing in it imports them, and the wheel does not ship them.
"""
