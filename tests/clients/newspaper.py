"""The newspaper with stomp.py's WSConnection, unmodified (it offers no
WebSocket subprotocol). Exits 0 when every reader got exactly its paper in
order, 1 with a reason otherwise.

    python3 tests/clients/newspaper.py 127.0.0.1 8080 [channel-prefix]
"""
import json
import sys
import threading
import time

import stomp

host, port = sys.argv[1], int(sys.argv[2])
prefix = sys.argv[3] if len(sys.argv) > 3 else ""
no01, no02 = f"{prefix}no01", f"{prefix}no02"
DEADLINE = time.monotonic() + 20


def fail(why):
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


class Reader(stomp.ConnectionListener):
    def __init__(self):
        self.bodies = []
        self.headers = []
        self.receipts = {}
        self.errors = []
        self.session = None
        self.changed = threading.Condition()

    def on_connected(self, frame):
        self.session = frame.headers.get("session")

    def on_message(self, frame):
        with self.changed:
            self.bodies.append(frame.body)
            self.headers.append(frame.headers)
            self.changed.notify_all()

    def on_receipt(self, frame):
        with self.changed:
            self.receipts[frame.headers["receipt-id"]] = frame.headers
            self.changed.notify_all()

    def on_error(self, frame):
        self.errors.append(frame.headers.get("message"))

    def wait(self, what, check):
        with self.changed:
            while not check():
                left = DEADLINE - time.monotonic()
                if left <= 0:
                    fail(f"timed out waiting for {what}; errors: {self.errors}")
                self.changed.wait(left)


def connect():
    conn = stomp.WSConnection([(host, port)], ws_path="/ws", heartbeats=(1000, 1000))
    listener = Reader()
    conn.set_listener("", listener)
    conn.connect(wait=True, headers={"accept-version": "1.2"})
    return conn, listener


def subscribe(conn, listener, paper, sub_id):
    conn.subscribe(f"/topic/{paper}", id=sub_id, ack="auto", headers={"receipt": sub_id})
    listener.wait(f"receipt {sub_id}", lambda: sub_id in listener.receipts)


readers = {name: connect() for name in ("user1", "user2", "user3")}
publisher, pub_listener = connect()

# Who reads no01 (the seed's new and close): a snapshot first, then joins
# and leaves.
watcher, who = connect()
watcher.subscribe(f"/presence/{no01}", id="who", ack="auto")
who.wait("presence snapshot", lambda: len(who.bodies) >= 1)
if who.headers[0].get("stompgate-presence") != "snapshot":
    fail(f"first presence MESSAGE {who.headers[0]}")
if json.loads(who.bodies[0])["members"] != []:
    fail(f"snapshot of a new paper {who.bodies[0]}")

subscribe(*readers["user1"], no01, "s1")
subscribe(*readers["user2"], no01, "s2")
subscribe(*readers["user3"], no02, "s3")
who.wait("presence joins", lambda: len(who.bodies) >= 3)
joined = [json.loads(body)["session"] for body in who.bodies[1:3]]
want = [readers["user1"][1].session, readers["user2"][1].session]
if joined != want or {h["stompgate-presence"] for h in who.headers[1:3]} != {"join"}:
    fail(f"presence joins {joined} {who.headers[1:3]}, not {want}")

issues = ["조선일보 1면", "page 2", "page 3"]
for body in issues:
    publisher.send(f"/pub/{no01}", body)
publisher.send(f"/topic/{no02}", "no02 only", headers={"receipt": "r-no02"})
publisher.send(f"/topic/{prefix}no99", "anyone?", headers={"receipt": "r-nobody"})
pub_listener.wait("receipts", lambda: {"r-no02", "r-nobody"} <= pub_listener.receipts.keys())
if pub_listener.receipts["r-no02"].get("routed") != "true":
    fail(f"no02 receipt {pub_listener.receipts['r-no02']}")
if pub_listener.receipts["r-nobody"].get("routed") != "false":
    fail(f"no99 receipt {pub_listener.receipts['r-nobody']}")
publisher.send(f"/topic/{no01}", "end", headers={"receipt": "r-end"})
pub_listener.wait("end receipt", lambda: "r-end" in pub_listener.receipts)

for name in ("user1", "user2"):
    _, listener = readers[name]
    listener.wait(f"{name} messages", lambda: len(listener.bodies) >= 4)
    if listener.bodies != issues + ["end"]:
        fail(f"{name} got {listener.bodies}")
    if listener.headers[0]["destination"] != f"/topic/{no01}":
        fail(f"{name} destination {listener.headers[0]['destination']}")
    # Who sent it, set by the gateway: the publisher's session.
    senders = [h.get("stompgate-sender-session") for h in listener.headers]
    if pub_listener.session is None or senders != [pub_listener.session] * len(senders):
        fail(f"{name} senders {senders}, not {pub_listener.session}")
_, user3 = readers["user3"]
user3.wait("user3 message", lambda: len(user3.bodies) >= 1)
if user3.bodies != ["no02 only"]:
    fail(f"user3 got {user3.bodies}")

# Addressed to a user (the seed's receiver): user3 logs in as a user of its
# own (auth.mode = "none": the login names it) and reads its inbox.
inbox_conn = stomp.WSConnection([(host, port)], ws_path="/ws", heartbeats=(1000, 1000))
inbox = Reader()
inbox_conn.set_listener("", inbox)
inbox_user = f"reader{prefix}".replace(".", "").replace("-", "")
inbox_conn.connect(wait=True, headers={"accept-version": "1.2", "login": inbox_user})
inbox_conn.subscribe("/user/queue/inbox", id="inbox", ack="auto", headers={"receipt": "sub-inbox"})
inbox.wait("inbox receipt", lambda: "sub-inbox" in inbox.receipts)
publisher.send(f"/user/{inbox_user}/queue/inbox", "for one reader", headers={"receipt": "r-direct"})
pub_listener.wait("addressed receipt", lambda: "r-direct" in pub_listener.receipts)
if pub_listener.receipts["r-direct"].get("routed") != "true":
    fail(f"addressed receipt {pub_listener.receipts['r-direct']}")
inbox.wait("addressed message", lambda: len(inbox.bodies) >= 1)
if inbox.bodies != ["for one reader"] or inbox.headers[0]["destination"] != "/user/queue/inbox":
    fail(f"inbox got {inbox.bodies} {inbox.headers}")
inbox_conn.disconnect()

readers["user2"][0].disconnect()
who.wait("presence leave", lambda: len(who.bodies) >= 4)
left = json.loads(who.bodies[3])
if [left["presence"], left["session"], left["reason"]] != ["leave", want[1], "disconnect"]:
    fail(f"presence leave {left}")

for conn, _ in [readers["user1"], readers["user3"], (publisher, pub_listener), (watcher, who)]:
    conn.disconnect()
print(json.dumps({
    "client": "stomp.py",
    "user1": readers["user1"][1].bodies,
    "user2": readers["user2"][1].bodies,
    "user3": user3.bodies,
    "presence": [json.loads(body)["presence"] for body in who.bodies],
}, ensure_ascii=False))
