from twisted.application.service import ServiceMaker

chat = ServiceMaker(
    "chatproto", "chatproto.startup", "A chat server speaking the chatproto wire contract.", "chat"
)
