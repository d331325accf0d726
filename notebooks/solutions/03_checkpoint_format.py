"""Solutions to the exercises of 03_checkpoint_format.ipynb (one function per exercise)."""


def encode_varint(n):
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def parse_tag(tag):
    return tag >> 3, tag & 7


def mask_crc_mine(crc):
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return (rotated + 0xA282EAD8) & 0xFFFFFFFF
