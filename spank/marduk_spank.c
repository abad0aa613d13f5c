/*
 * marduk_spank.c - the marduk-slurm SPANK plugin (Slurm >= 21.08; tested on 22.05).
 *
 * In every job step it
 *   - adds the option --marduk[=on|off] to sbatch, salloc and srun;
 *   - exports MARDUK_JOB_ID, MARDUK_STEP_ID, MARDUK_NODE, MARDUK_GPUS and MARDUK_NATS_URL
 *     into each task (task_init, as the job's user);
 *   - reports step start and step end to the node agent's Unix socket, once per step and
 *     node, from slurmstepd while it runs as root (task_post_fork of the first local task,
 *     and exit), so the agent can trust the peer credentials of the connection.
 *
 * The wire format is one JSON object per line on a Unix STREAM socket, no reply:
 *   {"v":1,"event":"step_start","job_id":1,"step_id":0,"node":"n1","gpu_indices":[0],
 *    "pid":42,"uid":1000}
 *   {"v":1,"event":"step_end","job_id":1,"step_id":0,"node":"n1","exit_status":0,
 *    "pid":42,"uid":1000}
 *
 * A job never fails or waits because the agent is down: the connect is non-blocking, the
 * whole report has a deadline (timeout_ms, default 200), errors are logged at info level
 * and the callback returns 0. Only strict=1 in plugstack.conf makes a failed report an
 * error, and Slurm fails the step for that only when the plugin line says `required`.
 *
 * plugstack.conf arguments: default=on|off  socket=PATH  nats_url=URL  strict=0|1
 *                           timeout_ms=N  creds_dir=PATH
 * Build: see the Makefile (gcc -shared -fPIC, no -lslurm: slurmstepd provides the symbols).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>

SPANK_PLUGIN(marduk, 1);

/* Step ids Slurm gives to the non-srun steps (slurm.h: SLURM_EXTERN_CONT etc.). */
#define MARDUK_EXTERN_STEP 4294967292u

#define MARDUK_DEFAULT_SOCKET "/run/marduk/agent.sock"
#define MARDUK_DEFAULT_TIMEOUT_MS 200

struct marduk_conf {
	int default_on;
	int strict;
	int timeout_ms;
	char socket_path[sizeof(((struct sockaddr_un *) 0)->sun_path)];
	char nats_url[512];
	char creds_dir[512];
};

static struct marduk_conf conf = {
	.default_on = 1,
	.strict = 0,
	.timeout_ms = MARDUK_DEFAULT_TIMEOUT_MS,
	.socket_path = MARDUK_DEFAULT_SOCKET,
	.nats_url = "",
	.creds_dir = "",
};

/* -1 until the user gives --marduk; then 0 (off) or 1 (on). */
static int opt_state = -1;
/* slurmstepd state: the callbacks of one step run in one process, so statics persist. */
static int start_reported;
static int exit_seen;
static int step_exit_status;

static int marduk_enabled(void)
{
	return opt_state >= 0 ? opt_state : conf.default_on;
}

/* on/off words as users write them; -1 for anything else */
static int parse_switch(const char *text)
{
	static const char *on[] = { "on", "1", "yes", "true", NULL };
	static const char *off[] = { "off", "0", "no", "false", NULL };
	int i;

	if (text == NULL || *text == '\0')
		return 1; /* a bare --marduk means on */
	for (i = 0; on[i]; i++)
		if (strcasecmp(text, on[i]) == 0)
			return 1;
	for (i = 0; off[i]; i++)
		if (strcasecmp(text, off[i]) == 0)
			return 0;
	return -1;
}

static int marduk_opt_cb(int val, const char *optarg, int remote)
{
	int state = parse_switch(optarg);

	(void) val;
	(void) remote;
	if (state < 0) {
		slurm_error("marduk: --marduk takes on or off, not '%s'", optarg);
		return -1;
	}
	opt_state = state;
	return 0;
}

/* has_arg 2: the value is optional, so it must be attached: --marduk=off */
static struct spank_option marduk_options[] = {
	{ "marduk", "[on|off]",
	  "Marduk fault-tolerance monitoring of this job (default from plugstack.conf)",
	  2, 0, (spank_opt_cb_f) marduk_opt_cb },
	SPANK_OPTIONS_TABLE_END
};

static void copy_arg(char *dst, size_t size, const char *value, const char *name)
{
	if (strlen(value) >= size)
		slurm_error("marduk: plugstack argument %s is too long; truncated", name);
	snprintf(dst, size, "%s", value);
}

static void parse_plugstack_args(int ac, char **av)
{
	int i, state;

	for (i = 0; i < ac; i++) {
		const char *arg = av[i];

		if (strncmp(arg, "default=", 8) == 0) {
			state = parse_switch(arg + 8);
			if (state < 0)
				slurm_error("marduk: bad plugstack argument '%s'", arg);
			else
				conf.default_on = state;
		} else if (strncmp(arg, "strict=", 7) == 0) {
			conf.strict = parse_switch(arg + 7) == 1;
		} else if (strncmp(arg, "socket=", 7) == 0) {
			copy_arg(conf.socket_path, sizeof(conf.socket_path), arg + 7, "socket");
		} else if (strncmp(arg, "nats_url=", 9) == 0) {
			copy_arg(conf.nats_url, sizeof(conf.nats_url), arg + 9, "nats_url");
		} else if (strncmp(arg, "creds_dir=", 10) == 0) {
			copy_arg(conf.creds_dir, sizeof(conf.creds_dir), arg + 10, "creds_dir");
		} else if (strncmp(arg, "timeout_ms=", 11) == 0) {
			conf.timeout_ms = atoi(arg + 11);
			if (conf.timeout_ms <= 0)
				conf.timeout_ms = MARDUK_DEFAULT_TIMEOUT_MS;
		} else {
			/* A typo must not fail jobs; it is logged where admins look. */
			slurm_error("marduk: unknown plugstack argument '%s'", arg);
		}
	}
}

/* ---- the agent socket ---------------------------------------------------------------- */

static long long now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait until fd is writable or the deadline passes; 0 when writable. */
static int wait_writable(int fd, long long deadline_ms)
{
	struct pollfd pfd = { .fd = fd, .events = POLLOUT };
	long long left = deadline_ms - now_ms();
	int rc;

	if (left <= 0)
		return -1;
	do {
		rc = poll(&pfd, 1, (int) left);
	} while (rc < 0 && errno == EINTR);
	if (rc <= 0)
		return -1;
	return (pfd.revents & POLLOUT) ? 0 : -1;
}

/*
 * The socket path with "%n" replaced by the node name, as in slurm.conf's SlurmdSpoolDir:
 * several slurmd on one host (a test cluster, multiple-slurmd setups) each have their agent.
 */
static void socket_path_for(const char *node, char *out, size_t size)
{
	const char *src = conf.socket_path;
	size_t used = 0;

	while (*src && used + 1 < size) {
		if (src[0] == '%' && src[1] == 'n') {
			int n = snprintf(out + used, size - used, "%s", node);

			if (n < 0 || (size_t) n >= size - used)
				break;
			used += (size_t) n;
			src += 2;
		} else {
			out[used++] = *src++;
		}
	}
	out[used] = '\0';
}

static int connect_agent(const char *node, long long deadline_ms)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	int fd, err = 0;
	socklen_t len = sizeof(err);

	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	socket_path_for(node, addr.sun_path, sizeof(addr.sun_path));
	if (connect(fd, (struct sockaddr *) &addr, sizeof(addr)) == 0)
		return fd;
	/* A full listen backlog gives EAGAIN on Unix sockets: wait, but only until the deadline. */
	if ((errno == EAGAIN || errno == EINPROGRESS) && wait_writable(fd, deadline_ms) == 0 &&
	    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0)
		return fd;
	close(fd);
	return -1;
}

/* Send one line to the agent; 0 on success, -1 (errno kept) otherwise. */
static int send_to_agent(const char *node, const char *line)
{
	long long deadline = now_ms() + conf.timeout_ms;
	size_t off = 0, len = strlen(line);
	int fd, saved;

	fd = connect_agent(node, deadline);
	if (fd < 0)
		return -1;
	while (off < len) {
		ssize_t n = send(fd, line + off, len - off, MSG_NOSIGNAL);

		if (n > 0) {
			off += (size_t) n;
		} else if (n < 0 && errno == EINTR) {
			continue;
		} else if (n < 0 && errno == EAGAIN && wait_writable(fd, deadline) == 0) {
			continue;
		} else {
			saved = errno ? errno : ETIMEDOUT;
			close(fd);
			errno = saved;
			return -1;
		}
	}
	close(fd);
	return 0;
}

/* ---- what the step looks like ------------------------------------------------------ */

struct step_info {
	uint32_t job_id;
	uint32_t step_id;
	uid_t uid;
	char node[256];
	char gpus[256]; /* "0,1" as Slurm prints it; empty when the step has no GPUs */
};

static void read_node_name(spank_t sp, char *buf, int len)
{
	const char *env = getenv("SLURMD_NODENAME");

	if (env && *env) {
		snprintf(buf, (size_t) len, "%s", env);
		return;
	}
	if (spank_getenv(sp, "SLURMD_NODENAME", buf, len) == ESPANK_SUCCESS && *buf)
		return;
	if (gethostname(buf, (size_t) len) != 0)
		snprintf(buf, (size_t) len, "unknown");
	buf[len - 1] = '\0';
}

/* The step's GPUs: SLURM_STEP_GPUS, else CUDA_VISIBLE_DEVICES, else SLURM_JOB_GPUS
 * (the batch step has only the latter). */
static void read_gpus(spank_t sp, char *buf, int len)
{
	static const char *vars[] = { "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES",
				      "SLURM_JOB_GPUS", NULL };
	int i;

	for (i = 0; vars[i]; i++) {
		if (spank_getenv(sp, vars[i], buf, len) == ESPANK_SUCCESS && *buf)
			return;
	}
	buf[0] = '\0';
}

static int read_step(spank_t sp, struct step_info *info)
{
	memset(info, 0, sizeof(*info));
	if (spank_get_item(sp, S_JOB_ID, &info->job_id) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &info->step_id) != ESPANK_SUCCESS)
		return -1;
	if (spank_get_item(sp, S_JOB_UID, &info->uid) != ESPANK_SUCCESS)
		info->uid = (uid_t) -1;
	read_node_name(sp, info->node, sizeof(info->node));
	read_gpus(sp, info->gpus, sizeof(info->gpus));
	return 0;
}

/* ---- JSON -------------------------------------------------------------------------- */

/* Append a JSON string literal; node names are plain, but a stray quote must not break
 * the line the agent parses. */
static void json_string(char *out, size_t size, const char *text)
{
	size_t n = strlen(out);
	const unsigned char *p;

	if (n + 1 >= size)
		return;
	out[n++] = '"';
	for (p = (const unsigned char *) text; *p && n + 7 < size; p++) {
		if (*p == '"' || *p == '\\')
			n += (size_t) snprintf(out + n, size - n, "\\%c", *p);
		else if (*p < 0x20)
			n += (size_t) snprintf(out + n, size - n, "\\u%04x", *p);
		else
			out[n++] = (char) *p;
	}
	out[n++] = '"';
	out[n] = '\0';
}

/* "0,1" or "0-3,5" -> "[0,1]" / "[0,1,2,3,5]"; tokens that are not indices (UUIDs,
 * NoDevFiles) are skipped. */
static void json_indices(char *out, size_t size, const char *list)
{
	const char *p = list;
	int first = 1;

	strncat(out, "[", size - strlen(out) - 1);
	while (p && *p) {
		char *end;
		long lo = strtol(p, &end, 10), hi;

		if (end == p) {
			p = strchr(p, ',');
			p = p ? p + 1 : NULL;
			continue;
		}
		hi = lo;
		if (*end == '-')
			hi = strtol(end + 1, &end, 10);
		for (; lo <= hi && lo >= 0 && hi - lo < 4096; lo++) {
			size_t n = strlen(out);

			snprintf(out + n, size - n, "%s%ld", first ? "" : ",", lo);
			first = 0;
		}
		p = strchr(end, ',');
		p = p ? p + 1 : NULL;
	}
	strncat(out, "]", size - strlen(out) - 1);
}

static void json_head(char *out, size_t size, const char *event, const struct step_info *info)
{
	snprintf(out, size, "{\"v\":1,\"event\":\"%s\",\"job_id\":%u,\"step_id\":%u,\"node\":",
		 event, info->job_id, info->step_id);
	json_string(out, size, info->node);
}

static void json_tail(char *out, size_t size, const struct step_info *info)
{
	size_t n = strlen(out);

	snprintf(out + n, size - n, ",\"pid\":%d,\"uid\":%ld}\n", (int) getpid(),
		 (long) info->uid);
}

/* ---- reports ----------------------------------------------------------------------- */

static int report(const char *line, const struct step_info *info, const char *event)
{
	if (send_to_agent(info->node, line) == 0) {
		slurm_debug("marduk: reported %s of %u.%u", event, info->job_id, info->step_id);
		return 0;
	}
	slurm_info("marduk: cannot report %s of %u.%u to %s: %s", event, info->job_id,
		   info->step_id, conf.socket_path, strerror(errno));
	return conf.strict ? -1 : 0;
}

static int reportable(spank_t sp)
{
	uint32_t step_id = 0;

	if (!spank_remote(sp) || !marduk_enabled())
		return 0;
	if (spank_get_item(sp, S_JOB_STEPID, &step_id) != ESPANK_SUCCESS)
		return 0;
	return step_id != MARDUK_EXTERN_STEP; /* no tasks of the user run there */
}

static int report_step_start(spank_t sp)
{
	struct step_info info;
	char line[2048];
	size_t n;

	if (read_step(sp, &info) != 0)
		return 0;
	json_head(line, sizeof(line), "step_start", &info);
	n = strlen(line);
	snprintf(line + n, sizeof(line) - n, ",\"gpu_indices\":");
	json_indices(line, sizeof(line), info.gpus);
	json_tail(line, sizeof(line), &info);
	return report(line, &info, "step_start");
}

static int report_step_end(spank_t sp)
{
	struct step_info info;
	char line[1024];
	size_t n;

	if (read_step(sp, &info) != 0)
		return 0;
	json_head(line, sizeof(line), "step_end", &info);
	n = strlen(line);
	if (exit_seen)
		snprintf(line + n, sizeof(line) - n, ",\"exit_status\":%d", step_exit_status);
	else /* no task ever ran here (launch failed): unknown, not success */
		snprintf(line + n, sizeof(line) - n, ",\"exit_status\":null");
	json_tail(line, sizeof(line), &info);
	return report(line, &info, "step_end");
}

/* ---- SPANK callbacks ----------------------------------------------------------------- */

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	parse_plugstack_args(ac, av);
	/* Registering here (not through a spank_options symbol) is what makes the option
	 * reach sbatch and salloc as well as srun. */
	if (spank_option_register(sp, &marduk_options[0]) != ESPANK_SUCCESS)
		slurm_error("marduk: cannot register --marduk");
	return 0;
}

/* Runs in each task as the job's user, just before exec. */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	struct step_info info;
	char num[32];
	char creds[sizeof(conf.creds_dir) + 32];

	(void) ac;
	(void) av;
	if (!marduk_enabled() || read_step(sp, &info) != 0)
		return 0;
	snprintf(num, sizeof(num), "%u", info.job_id);
	spank_setenv(sp, "MARDUK_JOB_ID", num, 1);
	snprintf(num, sizeof(num), "%u", info.step_id);
	spank_setenv(sp, "MARDUK_STEP_ID", num, 1);
	spank_setenv(sp, "MARDUK_NODE", info.node, 1);
	spank_setenv(sp, "MARDUK_GPUS", info.gpus, 1);
	if (conf.nats_url[0])
		spank_setenv(sp, "MARDUK_NATS_URL", conf.nats_url, 1);
	if (conf.creds_dir[0]) {
		/* The agent writes the file (agent.job_credentials_dir) when it relays the step's
		 * start, a moment from now; the runtime waits for it to appear. */
		snprintf(creds, sizeof(creds), "%s/%u.json", conf.creds_dir, info.job_id);
		spank_setenv(sp, "MARDUK_NATS_CREDS", creds, 1);
	}
	return 0;
}

/* slurmstepd, as root, once per local task after all of them were forked: the first one
 * stands for the step on this node. */
int slurm_spank_task_post_fork(spank_t sp, int ac, char **av)
{
	(void) ac;
	(void) av;
	if (start_reported || !reportable(sp))
		return 0;
	start_reported = 1;
	return report_step_start(sp);
}

/* slurmstepd, as root, per local task: keep the first failure as the step's status. */
int slurm_spank_task_exit(spank_t sp, int ac, char **av)
{
	int status = 0, code;

	(void) ac;
	(void) av;
	if (spank_get_item(sp, S_TASK_EXIT_STATUS, &status) != ESPANK_SUCCESS)
		return 0;
	/* Shell convention: the exit code, or 128 + the signal that killed the task. */
	code = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
	if (!exit_seen || (step_exit_status == 0 && code != 0))
		step_exit_status = code;
	exit_seen = 1;
	return 0;
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	(void) ac;
	(void) av;
	/* Only steps whose start went out get an end, so the agent sees pairs. */
	if (!start_reported || !reportable(sp))
		return 0;
	return report_step_end(sp);
}
