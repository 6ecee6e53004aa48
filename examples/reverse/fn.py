"""AubeFaaS's sample function, unchanged: replies to every message with the message reversed."""


def fn(websocket):
    for message in websocket:
        websocket.send(message[::-1])
