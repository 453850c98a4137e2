/*
 * A bare fd-passing peer, as plain C programs do it: two 4 MiB memfds,
 * "shma" of 'A' and "shmb" of 'B', sent in one sendmsg over SOCK_STREAM
 * beside 256 bytes of filler, with no header and no answer awaited.
 * `cargo xtask vm` builds it statically and runs it against
 * `sealpass-recv --compat` on an older kernel.
 *
 * usage: bare_sender SOCKET_PATH
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define SEGMENT (4 << 20)

static int filled_memfd(const char *name, char byte) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, SEGMENT) != 0) return -1;
    static char chunk[1 << 16];
    memset(chunk, byte, sizeof chunk);
    for (off_t at = 0; at < SEGMENT; at += sizeof chunk)
        if (pwrite(fd, chunk, sizeof chunk, at) != (ssize_t)sizeof chunk) return -1;
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET_PATH\n", argv[0]);
        return 2;
    }
    int fds[2] = {filled_memfd("shma", 'A'), filled_memfd("shmb", 'B')};
    if (fds[0] < 0 || fds[1] < 0) { perror("memfd"); return 1; }

    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    if (sock < 0 || connect(sock, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }

    char filler[256] = {0};
    struct iovec iov = {.iov_base = filler, .iov_len = sizeof filler};
    union {
        char bytes[CMSG_SPACE(sizeof fds)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.bytes,
        .msg_controllen = sizeof control.bytes,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    if (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0) {
        perror("sendmsg");
        return 1;
    }
    close(sock);
    return 0;
}
