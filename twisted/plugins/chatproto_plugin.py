from twisted.application.service import ServiceMaker

chat = ServiceMaker(
    "chatproto", "chatproto.service", "A chat server speaking the chatproto wire contract.", "chat"
)
